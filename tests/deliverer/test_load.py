"""The load a deliverer reports to the scheduler: the time its event loop's thread ran or
waited to run, read from Linux schedstat (the process's CPU time elsewhere). (The real
/proc of this process.)"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from deliverer.worker import Deliverer, _busy_seconds


def test_busy_time_follows_the_work_done() -> None:
    before, start = _busy_seconds(), time.monotonic()
    while time.monotonic() - start < 0.3:  # (busy)
        pass
    busy = _busy_seconds() - before
    assert 0.15 <= busy <= time.monotonic() - start + 0.05
    before = _busy_seconds()
    time.sleep(0.3)  # (idle)
    assert _busy_seconds() - before < 0.1


async def test_the_reported_load_is_a_share_of_the_time_and_never_zero() -> None:
    worker = SimpleNamespace(_load=0.001, _load_at=time.monotonic(), _load_busy=_busy_seconds())
    assert Deliverer._cpu_load(worker) == 0.001  # type: ignore[arg-type]  # (too soon)
    await asyncio.sleep(0.6)  # (idle)
    idle = Deliverer._cpu_load(worker)  # type: ignore[arg-type]
    assert 0 < idle < 0.2
    start = time.monotonic()
    while time.monotonic() - start < 0.6:
        pass
    assert Deliverer._cpu_load(worker) > 0.4  # type: ignore[arg-type]
