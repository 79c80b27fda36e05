"""Which lane a pointer goes to: its domain's own queues, or a hash bucket.

A domain with many recipients in one job (`[expander] dedicated_threshold`) gets dedicated
queues (lane "d") and is registered in KV `sluice_lanes` (value: the unix time the entry
lapses) so that later jobs to it follow, whatever their size. Every other domain goes to one
of `[expander] buckets` hash-bucket lanes. Consumers are per (tier, lane, tenant) and, in the
dedicated lane, per domain too: their number grows with busy domains and active tenants, not
with the number of domains a blast touches (docs/scheduling.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable

from nats.js import JetStreamContext
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from sluice import names

__all__ = ["Lanes"]

log = logging.getLogger(__name__)


class Lanes:
    def __init__(self, js: JetStreamContext, buckets: int, ttl: float) -> None:
        self._js = js
        self._buckets = buckets
        self._ttl = ttl
        self._busy: dict[str, float] = {}  # domain key -> when the entry lapses
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        kv = await self._js.key_value(names.LANES_BUCKET)
        watcher = await kv.watchall()
        ready = asyncio.Event()
        self._task = asyncio.create_task(self._follow(watcher, ready))
        await asyncio.wait_for(ready.wait(), 30)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _follow(self, watcher: KeyValue.KeyWatcher, ready: asyncio.Event) -> None:
        async for entry in watcher:
            if entry is None:  # the initial values have all arrived
                ready.set()
                continue
            if entry.operation in (KV_DEL, KV_PURGE):
                self._busy.pop(entry.key, None)
                continue
            try:
                self._busy[entry.key] = float(entry.value or b"0")
            except ValueError:
                continue

    def dedicated(self, key: str) -> bool:
        until = self._busy.get(key)
        return until is not None and until > time.time()

    def lane(self, key: str, busy: bool = False) -> str:
        if busy or self.dedicated(key):
            return names.DEDICATED_LANE
        return names.bucket_lane(key, self._buckets)

    async def promote(self, keys: Iterable[str]) -> None:
        """Give these domains dedicated queues from now on (for `ttl`, renewed by use)."""
        now = time.time()
        for key in keys:
            if self._busy.get(key, 0.0) > now + self._ttl / 2:
                continue  # registered recently enough
            until = now + self._ttl
            self._busy[key] = until
            await self._js.publish(
                f"$KV.{names.LANES_BUCKET}.{key}",
                f"{until:.0f}".encode(),
                headers={"Nats-TTL": f"{int(self._ttl)}s"},
            )
            log.info("domain %s has dedicated queues", names.key_domain(key))
