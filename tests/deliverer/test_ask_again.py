"""A deliverer asks for work again as soon as one of its leases ends, not after idle_poll:
a deliverer whose lanes ran dry otherwise idled up to idle_poll while the other finished a
blast's last lanes alone (bench.compare: a tenth of the cores idle over the last half
second). The scheduler here is a stand-in for the gRPC client (the seam the lease loop
talks through), so that when each call comes can be read; the rest is real (NATS)."""

from __future__ import annotations

import asyncio
import time
from typing import cast

from deliverer.schedclient import SchedulerClient
from deliverer.worker import Deliverer
from sluice import config as config_mod
from sluice import names
from sluice.nats_layout import connect, ensure_layout
from sluice.natsserver import NatsServer
from sluice.outcomes import BatchPublisher
from sluice.resolver import Resolver
from sluice.store import open_store
from sluice.v1 import scheduler_pb2
from tests.conftest import make_config

IDLE_POLL = 60.0


class Scheduler:
    """Grants one lane lease (with no queues: its work ends at once), then nothing."""

    outcome_counts = True

    def __init__(self) -> None:
        self.asks: list[float] = []
        self.released: list[tuple[float, str]] = []
        self.third_ask = asyncio.Event()

    async def AcquireLeases(  # noqa: N802 - as on the client
        self, request: scheduler_pb2.AcquireLeasesRequest, timeout: float | None = None
    ) -> scheduler_pb2.AcquireLeasesResponse:
        self.asks.append(time.monotonic())
        if len(self.asks) == 3:
            self.third_ask.set()
        resp = scheduler_pb2.AcquireLeasesResponse()
        if len(self.asks) == 1:
            resp.leases.add(lease_id="l1", site_id="lane:b00", lane="b00", max_connections=4)
        return resp

    async def ReleaseLeases(  # noqa: N802
        self, request: scheduler_pb2.ReleaseLeasesRequest, timeout: float | None = None
    ) -> scheduler_pb2.ReleaseLeasesResponse:
        self.released += [(time.monotonic(), i) for i in request.lease_ids]
        return scheduler_pb2.ReleaseLeasesResponse()

    async def RenewLeases(  # noqa: N802
        self, request: scheduler_pb2.RenewLeasesRequest, timeout: float | None = None
    ) -> scheduler_pb2.RenewLeasesResponse:
        return scheduler_pb2.RenewLeasesResponse()

    async def ReportOutcomes(  # noqa: N802
        self, request: scheduler_pb2.ReportOutcomesRequest, timeout: float | None = None
    ) -> scheduler_pb2.ReportOutcomesResponse:
        return scheduler_pb2.ReportOutcomesResponse()


async def test_a_lease_that_ends_brings_the_next_ask_at_once(nats_server: NatsServer) -> None:
    cfg = make_config(nats_server.url, 53, 25)
    cfg = config_mod.replace(cfg, deliverer={"idle_poll": f"{IDLE_POLL:.0f}s"})
    nc = await connect(cfg, "test")
    try:
        js = nc.jetstream()
        await ensure_layout(js, cfg)
        scheduler = Scheduler()
        events = BatchPublisher(nc, names.EVENTS_STREAM)
        store = open_store(cfg.store, js)
        client = cast(SchedulerClient, scheduler)
        deliverer = Deliverer(cfg, js, store, Resolver(cfg.dns), client, events)
        stop = asyncio.Event()
        run = asyncio.create_task(deliverer.run(stop))
        try:
            await asyncio.wait_for(scheduler.third_ask.wait(), IDLE_POLL / 4)
        finally:
            stop.set()
            await asyncio.wait_for(run, 30)
        # Granted l1, asked again at once (nothing), l1's work ended and it was released,
        # and the next ask followed it rather than idle_poll later.
        assert [lease for _, lease in scheduler.released] == ["l1"]
        released_at = scheduler.released[0][0]
        assert scheduler.asks[1] < released_at <= scheduler.asks[2]
    finally:
        await nc.close()
