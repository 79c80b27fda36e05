"""The suppression list: recipients a tenant must not mail (hard bounces, complaints, manual).

State in KV `sluice_suppressions`, key "<tenant>.<sha256 of the lower-cased address>", value
a `Suppression` (address, reason, source, created_at, expires_at). Entries with an expiry are
also written with that per-message TTL, so the server removes them; readers check the expiry
too, because a TTL removal leaves no delete marker for a watch to see. Readers keep an
in-memory copy fed by a KV watch, so checking a blast's 100,000 recipients costs no broker
round trips.
"""

from __future__ import annotations

import hashlib
import logging
import time

from google.protobuf.message import DecodeError
from nats.js import JetStreamContext

from sluice import names
from sluice.kvmirror import KvMirror, kv_current
from sluice.nats_layout import kv_put_ttl
from sluice.v1 import messages_pb2

__all__ = [
    "Suppressions",
    "list_tenant",
    "normalise",
    "put",
    "put_unless_longer",
    "remove",
    "suppression_key",
]

log = logging.getLogger(__name__)


def normalise(email: str) -> str:
    return email.strip().lower()


def suppression_key(tenant_id: str, email: str) -> str:
    return f"{tenant_id}.{hashlib.sha256(normalise(email).encode()).hexdigest()[:40]}"


def _expired(entry: messages_pb2.Suppression, now: float) -> bool:
    return entry.HasField("expires_at") and entry.expires_at.ToNanoseconds() <= now * 1e9


def _decode(value: bytes) -> messages_pb2.Suppression:
    entry = messages_pb2.Suppression()
    try:
        entry.ParseFromString(value)
    except DecodeError:
        # Entries written before the value became a Suppression held only the reason.
        return messages_pb2.Suppression(reason=value.decode(errors="replace"))
    return entry


async def put(
    js: JetStreamContext,
    tenant_id: str,
    email: str,
    reason: str,
    source: messages_pb2.SuppressionSource.ValueType,
    ttl: float | None = None,
) -> messages_pb2.Suppression:
    """Suppress `email` for the tenant, for `ttl` seconds or (None) until removed."""
    now = time.time()
    entry = messages_pb2.Suppression(email=normalise(email), reason=reason[:300], source=source)
    entry.created_at.FromNanoseconds(int(now * 1e9))
    key = suppression_key(tenant_id, email)
    if ttl is None:
        kv = await js.key_value(names.SUPPRESSIONS_BUCKET)
        await kv.put(key, entry.SerializeToString())
    else:
        entry.expires_at.FromNanoseconds(int((now + ttl) * 1e9))
        await kv_put_ttl(js, names.SUPPRESSIONS_BUCKET, key, entry.SerializeToString(), ttl)
    return entry


async def put_unless_longer(
    js: JetStreamContext,
    tenant_id: str,
    email: str,
    reason: str,
    source: messages_pb2.SuppressionSource.ValueType,
    ttl: float,
) -> messages_pb2.Suppression:
    """Suppress for `ttl` seconds unless the address is already suppressed for longer (or
    for good): a mailbox-full bounce must not shorten a complaint's or a bad mailbox's
    entry."""
    kv = await js.key_value(names.SUPPRESSIONS_BUCKET)
    now = time.time()
    try:
        current = await kv.get(suppression_key(tenant_id, email))
    except Exception:  # KeyNotFoundError, KeyDeletedError
        current = None
    if current is not None and current.value:
        entry = _decode(current.value)
        if not _expired(entry, now) and (
            not entry.HasField("expires_at")
            or entry.expires_at.ToNanoseconds() >= (now + ttl) * 1e9
        ):
            return entry
    return await put(js, tenant_id, email, reason, source, ttl)


async def remove(js: JetStreamContext, tenant_id: str, email: str) -> bool:
    """Remove the tenant's entry for `email`; False if there was none (or it had expired)."""
    kv = await js.key_value(names.SUPPRESSIONS_BUCKET)
    key = suppression_key(tenant_id, email)
    try:
        current = await kv.get(key)
    except Exception:  # KeyNotFoundError, KeyDeletedError
        return False
    await kv.delete(key)
    return current.value is not None and not _expired(_decode(current.value), time.time())


async def list_tenant(js: JetStreamContext, tenant_id: str) -> list[messages_pb2.Suppression]:
    """The tenant's live entries, ordered by address."""
    now = time.time()
    entries = [
        _decode(v)
        for v in (await kv_current(js, names.SUPPRESSIONS_BUCKET, f"{tenant_id}.*")).values()
    ]
    # (An entry from before values held the address cannot be listed by it.)
    entries = [e for e in entries if e.email and not _expired(e, now)]
    entries.sort(key=lambda e: e.email)
    return entries


class Suppressions(KvMirror):
    """A watched copy of every tenant's entries, for the expander's per-recipient check."""

    def __init__(self, js: JetStreamContext) -> None:
        super().__init__(js, names.SUPPRESSIONS_BUCKET)

    def suppressed(self, tenant_id: str, email: str) -> bool:
        if not self.values:
            return False
        value = self.values.get(suppression_key(tenant_id, email))
        return value is not None and not _expired(_decode(value), time.time())
