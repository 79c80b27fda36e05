"""Idempotency keys (AIP-155): a repeat within the TTL returns the first response.

The key is claimed with a KV create carrying a per-message TTL (not the 2-minute dedup
window), so exactly one of many concurrent duplicates proceeds; the others wait for its
answer. A request with the same key and a different body answers 409.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

import grpc
from google.protobuf.message import Message
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from ingest.errors import ApiError
from sluice import names

__all__ = ["Claim", "IdempotencyStore", "fingerprint"]

_PENDING = b"P"
_DONE = b"D"


def fingerprint(method: str, request: Message, extra: bytes = b"") -> bytes:
    """What identifies a request's content: the method, its deterministic encoding and any
    content that travels beside it (a JSON blast's recipients)."""
    h = hashlib.sha256(method.encode())
    h.update(request.SerializeToString(deterministic=True))
    h.update(extra)
    return h.digest()


class Claim:
    """A claimed key: `complete` stores the response, `release` frees the key on failure."""

    def __init__(self, store: IdempotencyStore, key: str, fp: bytes, revision: int) -> None:
        self._store = store
        self.key = key
        self._fp = fp
        self._revision = revision

    async def complete(self, response: Message) -> None:
        await self._store.put(
            self.key, _DONE + self._fp + response.SerializeToString(), self._revision
        )

    async def release(self) -> None:
        await self._store.delete(self.key)


class IdempotencyStore:
    def __init__(self, js: JetStreamContext, ttl: float, wait: float) -> None:
        self._js = js
        self._ttl = ttl
        self._wait = wait

    @staticmethod
    def kv_key(tenant_id: str, request_id: str) -> str:
        return f"{tenant_id}.{hashlib.sha256(request_id.encode()).hexdigest()[:40]}"

    async def claim(
        self, tenant_id: str, request_id: str, fp: bytes, response_cls: type[Message]
    ) -> Claim | Message:
        """A Claim if this request goes ahead; the first response if it already went."""
        key = self.kv_key(tenant_id, request_id)
        kv = await self._js.key_value(names.IDEMPOTENCY_BUCKET)
        try:
            revision = await kv.create(key, _PENDING + fp, msg_ttl=self._ttl)
            return Claim(self, key, fp, revision)
        except KeyWrongLastSequenceError:
            pass
        deadline = time.monotonic() + self._wait
        while True:
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:
                # The first attempt failed and released the key: try to claim it again.
                return await self.claim(tenant_id, request_id, fp, response_cls)
            value = entry.value or b""
            if value[1:33] != fp:
                raise ApiError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    "IDEMPOTENCY_KEY_REUSED",
                    "this request_id was used for a different request",
                    [("request_id", "already used for a different request")],
                )
            if value[:1] == _DONE:
                return response_cls.FromString(value[33:])
            if time.monotonic() > deadline:
                raise ApiError(
                    grpc.StatusCode.ABORTED,
                    "IDEMPOTENCY_KEY_IN_PROGRESS",
                    "a request with this request_id is still in progress; retry",
                    retry_after=1.0,
                )
            await asyncio.sleep(0.02)

    async def put(self, key: str, value: bytes, revision: int) -> None:
        # kv.update has no TTL parameter: publish to the KV subject with the headers itself.
        await self._js.publish(
            f"$KV.{names.IDEMPOTENCY_BUCKET}.{key}",
            value,
            headers={
                "Nats-Expected-Last-Subject-Sequence": str(revision),
                "Nats-TTL": f"{int(self._ttl)}s",
            },
        )

    async def delete(self, key: str) -> None:
        kv = await self._js.key_value(names.IDEMPOTENCY_BUCKET)
        try:
            await kv.purge(key)
        except Exception:  # best effort: the TTL removes it anyway
            pass
