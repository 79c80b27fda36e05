"""A drain waits for the transactions still settling (their replies are awaited there since
the deliverer pipelines) at most `drain_timeout`: a pointer left unsettled comes back after
ack_wait, while a process that outlives its orchestrator's grace period is killed anyway."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pytest

from deliverer.background import Background
from deliverer.worker import Deliverer


async def test_settle_all_gives_up_at_its_bound(caplog: pytest.LogCaptureFixture) -> None:
    never = asyncio.get_running_loop().create_future()  # (a server that never answers)
    worker = SimpleNamespace(_settling=Background(8, "settling"))
    worker._settling.start(never)
    quick = asyncio.ensure_future(asyncio.sleep(0.05))
    worker._settling.start(quick)
    with caplog.at_level(logging.WARNING, logger="deliverer.worker"):
        await Deliverer.settle_all(worker, 0.3)  # type: ignore[arg-type]
    assert quick.done() and not never.done()
    assert "drain: transactions left unsettled: 1" in caplog.text
    never.cancel()


async def test_settle_all_without_a_bound_waits_for_every_settling() -> None:
    tasks = {asyncio.ensure_future(asyncio.sleep(0.05 * i)) for i in range(3)}
    worker = SimpleNamespace(_settling=Background(8, "settling"))
    for task in tasks:
        worker._settling.start(task)
    await Deliverer.settle_all(worker)  # type: ignore[arg-type]
    assert all(t.done() for t in tasks) and not len(worker._settling)
