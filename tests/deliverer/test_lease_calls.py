"""Hash-bucket lanes share their lease calls: a batch fetched while a call is in flight waits
for that call when it names the batch's domains, and its other domains go together in one
next call (in a long tail every fetched batch has new domains, and each batch made a call of
its own). The scheduler here is a stand-in for the gRPC client (the seam the lanes talk
through), so that what each call names can be read and its answer held back; the rest is
real (NATS)."""

from __future__ import annotations

import asyncio
from typing import cast

import grpc
from nats.aio.msg import Msg

from deliverer.schedclient import SchedulerClient
from deliverer.worker import Deliverer, Group
from sluice import names
from sluice.nats_layout import connect, ensure_layout
from sluice.natsserver import NatsServer
from sluice.outcomes import BatchPublisher
from sluice.resolver import Resolver
from sluice.store import open_store
from sluice.v1 import messages_pb2, scheduler_pb2
from tests.conftest import make_config


class Scheduler:
    """Answers domain calls once `answer` is set, naming each domain's site (site-<domain>);
    with `fail` set, a call fails as an unreachable scheduler's would."""

    outcome_counts = True

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.called = asyncio.Event()
        self.answer = asyncio.Event()
        self.fail = False

    async def AcquireLeases(  # noqa: N802 - as on the client
        self, request: scheduler_pb2.AcquireLeasesRequest, timeout: float | None = None
    ) -> scheduler_pb2.AcquireLeasesResponse:
        self.calls.append(list(request.domains))
        self.called.set()
        await self.answer.wait()
        if self.fail:
            raise _unavailable()
        resp = scheduler_pb2.AcquireLeasesResponse()
        for domain in request.domains:
            resp.domain_sites[domain] = f"site-{domain}"
        return resp

    async def ReleaseLeases(  # noqa: N802
        self, request: scheduler_pb2.ReleaseLeasesRequest, timeout: float | None = None
    ) -> scheduler_pb2.ReleaseLeasesResponse:
        return scheduler_pb2.ReleaseLeasesResponse()


def _unavailable() -> Exception:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone", ""
    )


def _batch(*domains: str) -> list[Group]:
    """A fetched batch as the lane hands it on: one transaction per domain (the pointers are
    all that is read of it before its sites are known)."""
    return [[(cast(Msg, None), messages_pb2.DeliveryPointer(domain=d))] for d in domains]


async def test_batches_fetched_meanwhile_share_the_next_call(nats_server: NatsServer) -> None:
    cfg = make_config(nats_server.url, 53, 25)
    nc = await connect(cfg, "test")
    try:
        js = nc.jetstream()
        await ensure_layout(js, cfg)
        scheduler = Scheduler()
        deliverer = Deliverer(
            cfg,
            js,
            open_store(cfg.store, js),
            Resolver(cfg.dns),
            cast(SchedulerClient, scheduler),
            BatchPublisher(nc, names.EVENTS_STREAM),
        )
        first = asyncio.create_task(deliverer._lease_sites(_batch("a.test", "b.test")))
        await asyncio.wait_for(scheduler.called.wait(), 10)
        # Fetched while the first call is in flight: b.test is in it, c.test and d.test wait
        # for the next one, together.
        second = asyncio.create_task(deliverer._lease_sites(_batch("b.test", "c.test")))
        third = asyncio.create_task(deliverer._lease_sites(_batch("c.test", "d.test")))
        await asyncio.sleep(0.2)
        assert scheduler.calls == [["a.test", "b.test"]]
        assert not (second.done() or third.done())
        scheduler.answer.set()
        await asyncio.wait_for(asyncio.gather(first, second, third), 10)
        assert scheduler.calls == [["a.test", "b.test"], ["c.test", "d.test"]]
        for d in ["a.test", "b.test", "c.test", "d.test"]:
            assert deliverer._site_of[d] == f"site-{d}"

        # Domains whose sites are known are not asked for again (their sites have no lease
        # here, so they are: once, in one call).
        await asyncio.wait_for(deliverer._lease_sites(_batch("a.test", "e.test")), 10)
        assert scheduler.calls[2:] == [["a.test", "e.test"]]
        await asyncio.wait_for(deliverer._lease_sites(_batch()), 10)
        assert len(scheduler.calls) == 3

        # A failed call answers its batches all the same (their mail has no site: it goes
        # back), and the next batch makes a call of its own.
        scheduler.fail = True
        await asyncio.wait_for(deliverer._lease_sites(_batch("f.test")), 10)
        assert "f.test" not in deliverer._site_of
        scheduler.fail = False
        await asyncio.wait_for(deliverer._lease_sites(_batch("f.test")), 10)
        assert scheduler.calls[3:] == [["f.test"], ["f.test"]]
        assert deliverer._site_of["f.test"] == "site-f.test"
        assert not deliverer._naming and not deliverer._next_domains and not deliverer._asking
    finally:
        await nc.close()
