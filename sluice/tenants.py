"""Tenants and API keys: state in NATS KV (sluice_tenants, sluice_keys), not config.

An API key is shown once at creation; only its SHA-256 digest is stored (the KV key).
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import time
from urllib.parse import urlsplit

from google.protobuf.timestamp_pb2 import Timestamp
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError

from sluice import names
from sluice.kvmirror import kv_current
from sluice.singleflight import SingleFlight
from sluice.v1 import messages_pb2, tenant_pb2

__all__ = [
    "TenantCache",
    "TenantStore",
    "hash_key",
    "new_api_key",
    "new_webhook_secret",
    "unsubscribe_url_problem",
    "valid_tenant_id",
]

_TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def valid_tenant_id(tenant_id: str) -> bool:
    """Tenant ids are subject tokens: lower-case letters, digits and '-'."""
    return bool(_TENANT_ID.match(tenant_id))


# The List-Unsubscribe header must fit one line of at most 998 characters (RFC 5322 2.1.1;
# RFC 2369 forbids whitespace, so folding, inside the brackets) once {{recipient}} and
# {{message_id}} are filled in, URL-encoded; 800 leaves room for those of usual length.
MAX_UNSUBSCRIBE_URL = 800
_UNSUBSCRIBE_SCHEMES = ("https", "http", "mailto")
_URL_UNSAFE = re.compile(r"[\x00-\x20\x7f<>\"]")


def unsubscribe_url_problem(url: str) -> str | None:
    """Why `url` cannot be a tenant's List-Unsubscribe target, or None (an empty one is
    fine: no header)."""
    if not url:
        return None
    if len(url) > MAX_UNSUBSCRIBE_URL:
        return f"is {len(url)} characters; at most {MAX_UNSUBSCRIBE_URL}"
    if not url.isascii() or _URL_UNSAFE.search(url):
        return "must be ASCII without spaces, control characters, '<', '>' or '\"' (percent-encode)"
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as exc:
        return f"is not a valid URL: {exc}"
    if parts.scheme.lower() not in _UNSUBSCRIBE_SCHEMES:
        return "must be an https, http or mailto URL"
    if parts.scheme.lower() == "mailto":
        return None if parts.path else "mailto needs an address"
    return None if host else "needs a host"


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def new_api_key() -> tuple[str, str]:
    """A fresh (api_key, key_id)."""
    key_id = secrets.token_hex(4)
    return f"sk_{key_id}_{secrets.token_urlsafe(24)}", key_id


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: "whsec_" + base64 of 24 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def now_ts() -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(time.time_ns())
    return ts


class TenantStore:
    """Reads and writes tenants and keys in KV."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def put_tenant(self, tenant: tenant_pb2.Tenant) -> None:
        if not valid_tenant_id(tenant.tenant_id):
            raise ValueError(f"invalid tenant id {tenant.tenant_id!r}: use [a-z0-9-]")
        if (why := unsubscribe_url_problem(tenant.unsubscribe_url)) is not None:
            raise ValueError(f"unsubscribe_url {why}")
        kv = await self._js.key_value(names.TENANTS_BUCKET)
        await kv.put(tenant.tenant_id, tenant.SerializeToString())

    async def get_tenant(self, tenant_id: str) -> tenant_pb2.Tenant | None:
        kv = await self._js.key_value(names.TENANTS_BUCKET)
        try:
            entry = await kv.get(tenant_id)
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        return tenant_pb2.Tenant.FromString(entry.value)

    async def list_tenants(self) -> list[tenant_pb2.Tenant]:
        values = await kv_current(self._js, names.TENANTS_BUCKET)
        return [tenant_pb2.Tenant.FromString(v) for _, v in sorted(values.items()) if v]

    async def create_key(
        self, tenant_id: str, tiers: list[messages_pb2.Tier.ValueType] | None = None
    ) -> tuple[str, tenant_pb2.ApiKey]:
        """Create a key for tenant_id; returns (the secret key, its record)."""
        api_key, key_id = new_api_key()
        record = tenant_pb2.ApiKey(
            key_id=key_id, tenant_id=tenant_id, tiers=tiers or [], created_at=now_ts()
        )
        kv = await self._js.key_value(names.KEYS_BUCKET)
        await kv.create(hash_key(api_key), record.SerializeToString())
        return api_key, record

    async def lookup_key(self, api_key: str) -> tenant_pb2.ApiKey | None:
        kv = await self._js.key_value(names.KEYS_BUCKET)
        try:
            entry = await kv.get(hash_key(api_key))
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        return tenant_pb2.ApiKey.FromString(entry.value)

    async def list_keys(self) -> list[tuple[str, tenant_pb2.ApiKey]]:
        values = await kv_current(self._js, names.KEYS_BUCKET)
        return [(d, tenant_pb2.ApiKey.FromString(v)) for d, v in sorted(values.items()) if v]

    async def revoke_key(self, key_id: str) -> bool:
        """Mark the key with this key_id revoked; False if there is none."""
        kv = await self._js.key_value(names.KEYS_BUCKET)
        for digest, record in await self.list_keys():
            if record.key_id == key_id:
                record.revoked = True
                await kv.put(digest, record.SerializeToString())
                return True
        return False


class TenantCache:
    """Tenants read through a short-lived cache (changes show within `ttl` seconds)."""

    def __init__(self, store: TenantStore, ttl: float) -> None:
        self._store = store
        self._ttl = ttl
        self._cache: dict[str, tuple[float, tenant_pb2.Tenant | None]] = {}
        # One read per tenant at a time: callers that miss meanwhile wait for it.
        self._reads: SingleFlight[str, tenant_pb2.Tenant | None] = SingleFlight()

    async def get(self, tenant_id: str) -> tenant_pb2.Tenant | None:
        hit = self._cache.get(tenant_id)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        return await self._reads.do(tenant_id, lambda: self._read(tenant_id))

    async def _read(self, tenant_id: str) -> tenant_pb2.Tenant | None:
        tenant = await self._store.get_tenant(tenant_id)
        self._cache[tenant_id] = (time.monotonic() + self._ttl, tenant)
        return tenant
