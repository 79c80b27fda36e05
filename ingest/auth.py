"""Bearer-token authentication: API key -> (key record, tenant), cached briefly."""

from __future__ import annotations

import time

import grpc

from ingest.errors import ApiError
from sluice.tenants import TenantStore, hash_key
from sluice.v1 import tenant_pb2

__all__ = ["Authenticator", "Principal"]

Principal = tuple[tenant_pb2.ApiKey, tenant_pb2.Tenant]


def unauthenticated(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", message)


class Authenticator:
    """Resolves "Bearer <key>" to the key record and its tenant."""

    def __init__(self, tenants: TenantStore, cache_ttl: float) -> None:
        self._tenants = tenants
        self._ttl = cache_ttl
        self._cache: dict[str, tuple[float, Principal]] = {}

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise unauthenticated("missing Authorization: Bearer <api key>")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise unauthenticated('Authorization must be "Bearer <api key>"')
        digest = hash_key(token)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            principal = hit[1]
        else:
            key = await self._tenants.lookup_key(token)
            if key is None:
                raise unauthenticated("unknown API key")
            tenant = await self._tenants.get_tenant(key.tenant_id)
            if tenant is None:
                raise unauthenticated("unknown API key")
            principal = (key, tenant)
            self._cache[digest] = (now + self._ttl, principal)
            if len(self._cache) > 10_000:
                self._cache.clear()
        if principal[0].revoked:
            raise ApiError(grpc.StatusCode.PERMISSION_DENIED, "API_KEY_REVOKED", "API key revoked")
        return principal
