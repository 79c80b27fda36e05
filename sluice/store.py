"""The payload store seam: URIs in, bytes out.

`payload_ref` is a URI. The embedded default is a JetStream object-store bucket,
`nats-os://<bucket>/<key>`. Library errors are translated into `StoreError`.
"""

from __future__ import annotations

from typing import Protocol
from urllib.parse import urlsplit

from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import BucketNotFoundError, NotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

__all__ = ["NatsObjectStore", "PayloadNotFound", "PayloadStore", "StoreError", "open_store"]


class StoreError(Exception):
    """The store could not write or read a payload."""


class PayloadNotFound(StoreError):
    """The payload does not exist (expired or never written)."""


class PayloadStore(Protocol):
    async def put(self, key: str, data: bytes) -> str:
        """Store data under key; return its URI."""
        ...

    async def get(self, uri: str) -> bytes:
        """The bytes at uri."""
        ...


class NatsObjectStore:
    """Payloads in a JetStream object-store bucket."""

    def __init__(self, js: JetStreamContext, bucket: str, replicas: int = 1) -> None:
        self._js = js
        self._bucket = bucket
        self._replicas = replicas
        self._obs: ObjectStore | None = None

    async def _store(self) -> ObjectStore:
        if self._obs is None:
            try:
                self._obs = await self._js.object_store(self._bucket)
            except BucketNotFoundError:
                self._obs = await self._js.create_object_store(
                    self._bucket,
                    config=js_api.ObjectStoreConfig(
                        storage=js_api.StorageType.FILE, replicas=self._replicas
                    ),
                )
        return self._obs

    async def put(self, key: str, data: bytes) -> str:
        try:
            obs = await self._store()
            await obs.put(key, data)
        except Exception as exc:
            raise StoreError(f"object store put {key}: {exc!r}") from exc
        return f"nats-os://{self._bucket}/{key}"

    async def get(self, uri: str) -> bytes:
        parts = urlsplit(uri)
        if parts.scheme != "nats-os" or parts.netloc != self._bucket:
            raise StoreError(f"not a payload of this store: {uri}")
        key = parts.path.lstrip("/")
        try:
            obs = await self._store()
            result = await obs.get(key)
        except (ObjectNotFoundError, NotFoundError) as exc:
            raise PayloadNotFound(uri) from exc
        except Exception as exc:
            raise StoreError(f"object store get {uri}: {exc!r}") from exc
        return bytes(result.data or b"")


def open_store(url: str, js: JetStreamContext, replicas: int = 1) -> PayloadStore:
    """The store named by the [store] url setting."""
    parts = urlsplit(url)
    if parts.scheme == "nats-os" and parts.netloc:
        return NatsObjectStore(js, parts.netloc, replicas)
    raise StoreError(f"unsupported store url {url!r} (supported: nats-os://<bucket>)")
