"""A streamed batch's payloads are read from the object store once per deliverer, however
many connection loops need them at once (real NATS object store)."""

from __future__ import annotations

import asyncio

from deliverer.schedclient import SchedulerClient
from deliverer.worker import Deliverer
from sluice import names
from sluice.config import Config
from sluice.nats_layout import connect, ensure_layout
from sluice.natsserver import NatsServer
from sluice.outcomes import BatchPublisher
from sluice.resolver import Resolver
from sluice.store import PayloadStore, open_store
from sluice.v1 import messages_pb2
from tests.conftest import make_config


class CountingStore:
    """The real store, counting reads."""

    def __init__(self, store: PayloadStore) -> None:
        self._store = store
        self.reads: list[str] = []

    async def put(self, key: str, data: bytes) -> str:
        return await self._store.put(key, data)

    async def get(self, uri: str) -> bytes:
        self.reads.append(uri)
        return await self._store.get(uri)

    async def delete(self, uri: str) -> None:
        await self._store.delete(uri)

    async def close(self) -> None:
        await self._store.close()


async def test_concurrent_misses_read_a_batch_once(nats_server: NatsServer) -> None:
    cfg: Config = make_config(nats_server.url, 53, 25)
    nc = await connect(cfg, "test")
    try:
        js = nc.jetstream()
        await ensure_layout(js, cfg)
        store = open_store(cfg.store, js)
        batch = messages_pb2.PayloadBatch()
        for i in range(300):
            batch.payloads.add(subject=f"message {i}", text="x" * 2000)
        uri = await store.put("batch1", batch.SerializeToString())

        counting = CountingStore(store)
        scheduler = SchedulerClient.from_config(cfg.deliverer)  # (never called here)
        events = BatchPublisher(nc, names.EVENTS_STREAM)
        deliverer = Deliverer(cfg, js, counting, Resolver(cfg.dns), scheduler, events)
        got = await asyncio.gather(*(deliverer._payload(f"{uri}#{i}") for i in range(300)))
        assert [p.subject for p in got] == [f"message {i}" for i in range(300)]
        assert counting.reads == [uri], f"{len(counting.reads)} reads of one batch"
        # Cached: later transactions read nothing.
        assert (await deliverer._payload(f"{uri}#7")).subject == "message 7"
        assert len(counting.reads) == 1
    finally:
        await nc.close()
