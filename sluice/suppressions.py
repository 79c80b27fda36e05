"""The suppression list: recipients a tenant must not mail (hard bounces, complaints, manual).

State in KV `sluice_suppressions`, key "<tenant>.<sha256 of the lower-cased address>",
value the reason. Readers keep an in-memory copy fed by a KV watch, so checking a blast's
100,000 recipients costs no broker round trips.
"""

from __future__ import annotations

import hashlib
import logging

from nats.js import JetStreamContext

from sluice import names
from sluice.kvmirror import KvMirror

__all__ = ["Suppressions", "suppression_key"]

log = logging.getLogger(__name__)


def suppression_key(tenant_id: str, email: str) -> str:
    return f"{tenant_id}.{hashlib.sha256(email.strip().lower().encode()).hexdigest()[:40]}"


class Suppressions(KvMirror):
    def __init__(self, js: JetStreamContext) -> None:
        super().__init__(js, names.SUPPRESSIONS_BUCKET)

    def suppressed(self, tenant_id: str, email: str) -> bool:
        return bool(self.values) and suppression_key(tenant_id, email) in self.values

    async def add(self, tenant_id: str, email: str, reason: str) -> None:
        kv = await self._js.key_value(names.SUPPRESSIONS_BUCKET)
        await kv.put(suppression_key(tenant_id, email), reason.encode())

    async def remove(self, tenant_id: str, email: str) -> None:
        kv = await self._js.key_value(names.SUPPRESSIONS_BUCKET)
        await kv.delete(suppression_key(tenant_id, email))
