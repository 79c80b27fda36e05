"""An in-memory copy of a KV bucket, kept current by a watch (readers on hot paths check it
without broker round trips)."""

from __future__ import annotations

import asyncio
import contextlib

from nats.js import JetStreamContext
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

__all__ = ["KvMirror"]


class KvMirror:
    def __init__(self, js: JetStreamContext, bucket: str) -> None:
        self._js = js
        self._bucket = bucket
        self.values: dict[str, bytes] = {}
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start following the bucket; returns once its current values are in."""
        kv = await self._js.key_value(self._bucket)
        watcher = await kv.watchall()
        self._task = asyncio.create_task(self._follow(watcher))
        await asyncio.wait_for(self.ready.wait(), 30)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is None:  # the initial values have all arrived
                self.ready.set()
            elif entry.operation in (KV_DEL, KV_PURGE):
                self.values.pop(entry.key, None)
            else:
                self.values[entry.key] = entry.value or b""
