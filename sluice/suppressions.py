"""The suppression list: recipients a tenant must not mail (hard bounces, complaints, manual).

State in KV `sluice_suppressions`, key "<tenant>.<sha256 of the lower-cased address>",
value the reason. Readers keep an in-memory copy fed by a KV watch, so checking a blast's
100,000 recipients costs no broker round trips.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging

from nats.js import JetStreamContext
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from sluice import names

__all__ = ["Suppressions", "suppression_key"]

log = logging.getLogger(__name__)


def suppression_key(tenant_id: str, email: str) -> str:
    return f"{tenant_id}.{hashlib.sha256(email.strip().lower().encode()).hexdigest()[:40]}"


class Suppressions:
    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self._keys: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    async def start(self) -> None:
        kv = await self._js.key_value(names.SUPPRESSIONS_BUCKET)
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
                continue
            if entry.operation in (KV_DEL, KV_PURGE):
                self._keys.discard(entry.key)
            else:
                self._keys.add(entry.key)

    def suppressed(self, tenant_id: str, email: str) -> bool:
        return bool(self._keys) and suppression_key(tenant_id, email) in self._keys

    async def add(self, tenant_id: str, email: str, reason: str) -> None:
        kv = await self._js.key_value(names.SUPPRESSIONS_BUCKET)
        await kv.put(suppression_key(tenant_id, email), reason.encode())

    async def remove(self, tenant_id: str, email: str) -> None:
        kv = await self._js.key_value(names.SUPPRESSIONS_BUCKET)
        await kv.delete(suppression_key(tenant_id, email))
