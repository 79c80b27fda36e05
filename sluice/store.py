"""The payload store seam: URIs in, bytes out.

`payload_ref` is a URI: `nats-os://<bucket>/<key>` (a JetStream object-store bucket, the
embedded default) or `s3://<bucket>/<key>` (S3 or an S3-compatible server). `[store] url`
says where new payloads are written; a payload is read (and deleted) by its URI whatever
that setting says, so mail queued before a switch stays deliverable. Library errors are
translated into `StoreError` / `PayloadNotFound` here and nowhere else.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol
from urllib.parse import urlsplit

import aioboto3
from botocore.config import Config as BotoConfig  # type: ignore[import-untyped]
from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import BucketNotFoundError, NotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from sluice.config import StoreConfig

__all__ = [
    "NatsObjectStore",
    "PayloadNotFound",
    "PayloadStore",
    "RoutedStore",
    "S3ObjectStore",
    "StoreError",
    "open_store",
]


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

    async def delete(self, uri: str) -> None:
        """Remove the payload at uri (no error if it is already gone)."""
        ...

    async def close(self) -> None:
        """Release connections (the NATS connection belongs to the caller)."""
        ...


def _split(uri: str, scheme: str) -> tuple[str, str]:
    """(bucket, key) of a `<scheme>://<bucket>/<key>` URI."""
    parts = urlsplit(uri)
    key = parts.path.lstrip("/")
    if parts.scheme != scheme or not parts.netloc or not key:
        raise StoreError(f"not a {scheme}:// payload URI: {uri!r}")
    return parts.netloc, key


# Bytes per chunk of a payload object. nats-py stores chunks one after another, each
# waiting for its PubAck: a streamed batch (1 MB) took nine round trips in 128 KiB chunks,
# most of the time the ingest waited for a batch to be durable. (Under nats-server's
# default max_payload of 1 MiB, with room for the headers.)
_CHUNK = 512 * 1024


class NatsObjectStore:
    """Payloads in a JetStream object-store bucket.

    The bucket written to is created on first use with `max_age` as its TTL (an existing
    bucket's TTL is brought to `max_age`); a bucket only read from is never created.
    """

    def __init__(
        self,
        js: JetStreamContext,
        bucket: str,
        replicas: int = 1,
        max_age: float = 0.0,
        create: bool = True,
    ) -> None:
        self._js = js
        self._bucket = bucket
        self._replicas = replicas
        self._max_age = max_age
        self._create = create
        self._obs: ObjectStore | None = None

    async def _store(self) -> ObjectStore:
        if self._obs is None:
            try:
                obs = await self._js.object_store(self._bucket)
            except BucketNotFoundError:
                if not self._create:
                    raise
                obs = await self._js.create_object_store(
                    self._bucket,
                    config=js_api.ObjectStoreConfig(
                        storage=js_api.StorageType.FILE,
                        replicas=self._replicas,
                        ttl=self._max_age or None,
                    ),
                )
            else:
                if self._create:
                    await self._apply_max_age()
            self._obs = obs
        return self._obs

    async def _apply_max_age(self) -> None:
        """An object store's TTL is its stream's max_age; nats-py cannot update it, the
        stream API can."""
        info = await self._js.stream_info(f"OBJ_{self._bucket}")
        if float(info.config.max_age or 0.0) != float(self._max_age):
            await self._js.update_stream(info.config.evolve(max_age=self._max_age))

    async def put(self, key: str, data: bytes) -> str:
        try:
            obs = await self._store()
            # (a server configured with a smaller max_payload gets smaller chunks)
            chunk = min(_CHUNK, max(self._js._nc.max_payload - 4096, 64 * 1024))
            meta = js_api.ObjectMeta(
                name=key, options=js_api.ObjectMetaOptions(max_chunk_size=chunk)
            )
            await obs.put(key, data, meta=meta)
        except Exception as exc:
            raise StoreError(f"object store put {key}: {exc!r}") from exc
        return f"nats-os://{self._bucket}/{key}"

    def _key(self, uri: str) -> str:
        bucket, key = _split(uri, "nats-os")
        if bucket != self._bucket:
            raise StoreError(f"not a payload of bucket {self._bucket}: {uri}")
        return key

    async def get(self, uri: str) -> bytes:
        key = self._key(uri)
        try:
            obs = await self._store()
            result = await obs.get(key)
        except (ObjectNotFoundError, NotFoundError, BucketNotFoundError) as exc:
            raise PayloadNotFound(uri) from exc
        except Exception as exc:
            raise StoreError(f"object store get {uri}: {exc!r}") from exc
        return bytes(result.data or b"")

    async def delete(self, uri: str) -> None:
        key = self._key(uri)
        try:
            obs = await self._store()
            await obs.delete(key)
        except (ObjectNotFoundError, NotFoundError, BucketNotFoundError):
            return
        except Exception as exc:
            raise StoreError(f"object store delete {uri}: {exc!r}") from exc

    async def close(self) -> None:
        return None


# Error codes S3 (and S3-compatible servers) answer for an object that is not there.
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


class S3ObjectStore:
    """Payloads in an S3 bucket (AWS, MinIO, Ceph RGW, ...), through one aioboto3 client.

    Writes go to `bucket`; `get` and `delete` follow the bucket in the URI. Expiry is the
    bucket's lifecycle rule (docs/storage.md), not Sluice's.
    """

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str = "",
        region: str = "us-east-1",
        access_key_id: str = "",
        secret_access_key: str = "",
        path_style: bool = False,
    ) -> None:
        self._bucket = bucket
        self._endpoint = endpoint_url or None
        self._region = region
        self._access_key_id = access_key_id or None
        self._secret_access_key = secret_access_key or None
        self._path_style = path_style
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    def _where(self) -> str:
        return self._endpoint or f"AWS S3 ({self._region})"

    async def _s3(self) -> Any:
        if self._client is None:
            session = aioboto3.Session()
            self._client = await self._stack.enter_async_context(
                session.client(
                    "s3",
                    endpoint_url=self._endpoint,
                    region_name=self._region,
                    aws_access_key_id=self._access_key_id,
                    aws_secret_access_key=self._secret_access_key,
                    config=BotoConfig(
                        connect_timeout=5,
                        read_timeout=30,
                        retries={"max_attempts": 3, "mode": "standard"},
                        s3={"addressing_style": "path" if self._path_style else "auto"},
                    ),
                )
            )
        return self._client

    def _error(self, op: str, uri: str, exc: Exception) -> StoreError:
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            if code in _NOT_FOUND_CODES:
                return PayloadNotFound(uri)
            if code == "NoSuchBucket":
                return StoreError(
                    f"S3 {op} {uri}: bucket does not exist at {self._where()} "
                    "(create it, with a lifecycle rule: docs/storage.md)"
                )
            return StoreError(f"S3 {op} {uri} at {self._where()}: {code} {err.get('Message', '')}")
        return StoreError(f"S3 {op} {uri}: cannot reach {self._where()}: {exc}")

    async def put(self, key: str, data: bytes) -> str:
        uri = f"s3://{self._bucket}/{key}"
        try:
            s3 = await self._s3()
            await s3.put_object(Bucket=self._bucket, Key=key, Body=data)
        except (ClientError, BotoCoreError) as exc:
            raise self._error("put", uri, exc) from exc
        return uri

    async def get(self, uri: str) -> bytes:
        bucket, key = _split(uri, "s3")
        try:
            s3 = await self._s3()
            resp = await s3.get_object(Bucket=bucket, Key=key)
            async with resp["Body"] as body:
                return bytes(await body.read())
        except (ClientError, BotoCoreError) as exc:
            raise self._error("get", uri, exc) from exc

    async def delete(self, uri: str) -> None:
        bucket, key = _split(uri, "s3")
        try:
            s3 = await self._s3()
            await s3.delete_object(Bucket=bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            err = self._error("delete", uri, exc)
            if not isinstance(err, PayloadNotFound):
                raise err from exc

    async def close(self) -> None:
        self._client = None
        await self._stack.aclose()


class RoutedStore:
    """Writes to the configured store; reads and deletes by the URI's scheme and bucket."""

    def __init__(self, cfg: StoreConfig, js: JetStreamContext, replicas: int = 1) -> None:
        self._cfg = cfg
        self._js = js
        self._replicas = replicas
        self._nats: dict[str, NatsObjectStore] = {}
        self._s3: S3ObjectStore | None = None
        parts = urlsplit(cfg.url)
        if parts.scheme == "nats-os" and parts.netloc and not parts.path.strip("/"):
            self._writer: PayloadStore = self._nats_bucket(parts.netloc, create=True)
        elif parts.scheme == "s3" and parts.netloc and not parts.path.strip("/"):
            self._writer = self._s3_store(parts.netloc)
        else:
            raise StoreError(
                f"unsupported [store] url {cfg.url!r} (supported: nats-os://<bucket>, "
                "s3://<bucket>)"
            )

    def _nats_bucket(self, bucket: str, create: bool = False) -> NatsObjectStore:
        store = self._nats.get(bucket)
        if store is None:
            store = NatsObjectStore(self._js, bucket, self._replicas, self._cfg.max_age, create)
            self._nats[bucket] = store
        return store

    def _s3_store(self, bucket: str) -> S3ObjectStore:
        if self._s3 is None:
            self._s3 = S3ObjectStore(
                bucket,
                endpoint_url=self._cfg.s3_endpoint_url,
                region=self._cfg.s3_region,
                access_key_id=self._cfg.s3_access_key_id,
                secret_access_key=self._cfg.s3_secret_access_key,
                path_style=self._cfg.s3_path_style,
            )
        return self._s3

    def _reader(self, uri: str) -> PayloadStore:
        parts = urlsplit(uri)
        if parts.scheme == "nats-os" and parts.netloc:
            return self._nats_bucket(parts.netloc)
        if parts.scheme == "s3" and parts.netloc:
            # One client serves every bucket; the bucket comes from the URI.
            return self._s3_store(parts.netloc)
        raise StoreError(f"unsupported payload URI {uri!r}")

    async def put(self, key: str, data: bytes) -> str:
        return await self._writer.put(key, data)

    async def get(self, uri: str) -> bytes:
        return await self._reader(uri).get(uri)

    async def delete(self, uri: str) -> None:
        await self._reader(uri).delete(uri)

    async def close(self) -> None:
        if self._s3 is not None:
            await self._s3.close()


def open_store(cfg: StoreConfig, js: JetStreamContext, replicas: int = 1) -> RoutedStore:
    """The store of the [store] section: writes where `url` says, reads any known URI."""
    return RoutedStore(cfg, js, replicas)
