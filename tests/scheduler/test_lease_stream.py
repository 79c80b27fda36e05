"""The Leases stream (SchedulerService.Leases) through SchedulerClient, the deliverer's
client: responses are matched to their requests, a waiting acquire holds up no other call,
an error answers one request without ending the stream, and a release (sent without asking
for a response) is applied before the calls after it. (A real scheduler service on a real
nats-server, sites from a real DNS server.)"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from deliverer.schedclient import SchedulerClient
from scheduler.server import SchedulerServicer
from sluice import config as config_mod
from sluice.config import Config
from sluice.devdns import DnsServer
from sluice.natsserver import NatsServer, free_port
from sluice.services import service
from sluice.v1 import scheduler_pb2
from tests.conftest import _listening, wait_for


class Running:
    """A scheduler service where full.test's site takes one connection at a time."""

    def __init__(self, listen: str, stop: asyncio.Event, task: asyncio.Task[None]) -> None:
        self.listen = listen
        self._stop = stop
        self._task = task

    async def stop(self) -> None:
        self._stop.set()
        await self._task


@contextlib.asynccontextmanager
async def _scheduler(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Running]:
    dns = DnsServer({"full.test": [("MX", "10 mx.full.test.")]})
    port = await dns.start()
    shaping = tmp_path / "shaping.toml"
    shaping.write_text('[domain."full.test"]\nmax_connections = 1\n')
    listen = f"127.0.0.1:{free_port()}"
    cfg = config_mod.replace(
        Config(),
        nats={"url": nats_server.url},
        dns={"nameservers": ["127.0.0.1"], "port": port},
        scheduler={"listen": listen, "shaping": str(shaping)},
    )
    stop = asyncio.Event()
    running = Running(listen, stop, asyncio.create_task(service("scheduler")(cfg, stop)))
    try:
        await wait_for(lambda: _listening(listen), 10, "scheduler to listen")
        yield running
    finally:
        await running.stop()
        dns.close()


@pytest.fixture
async def client(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[SchedulerClient]:
    async with _scheduler(nats_server, tmp_path) as running, SchedulerClient(running.listen) as c:
        yield c


def _acquire(deliverer: str, wait: float = 0.0) -> scheduler_pb2.AcquireLeasesRequest:
    return scheduler_pb2.AcquireLeasesRequest(
        deliverer_id=deliverer, domain="full.test", wait_ms=int(wait * 1000)
    )


async def test_calls_share_one_stream_without_holding_each_other_up(
    client: SchedulerClient,
) -> None:
    assert not client.outcome_counts  # (nothing has been said on the stream yet)
    (held,) = (await client.AcquireLeases(_acquire("d2"), timeout=10)).leases
    assert held.site_id == "mx.full.test" and held.max_connections == 1
    assert client.outcome_counts  # (the scheduler reads Outcome.count: its answer says so)

    # d1 waits for the full site; meanwhile the stream carries other calls.
    waiting = asyncio.ensure_future(client.AcquireLeases(_acquire("d1", wait=8), timeout=15))
    renewed = await client.RenewLeases(
        scheduler_pb2.RenewLeasesRequest(deliverer_id="d2", lease_ids=[held.lease_id]),
        timeout=10,
    )
    assert [ls.lease_id for ls in renewed.leases] == [held.lease_id]
    assert not renewed.lost_lease_ids
    assert not waiting.done(), "the waiting acquire is answered only when the site frees up"

    # A bad request is answered with its error; the stream goes on.
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await client.AcquireLeases(scheduler_pb2.AcquireLeasesRequest(domain="x.test"), timeout=10)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "deliverer_id" in (bad.value.details() or "")
    assert not waiting.done()

    # The release asks for no response; the waiting acquire gets the connection.
    await client.ReleaseLeases(
        scheduler_pb2.ReleaseLeasesRequest(deliverer_id="d2", lease_ids=[held.lease_id])
    )
    (granted,) = (await asyncio.wait_for(waiting, 15)).leases
    assert granted.site_id == "mx.full.test" and granted.lease_id != held.lease_id

    # A release is applied before what is sent after it: the site's one connection is free
    # for the next acquire at once, with no wait.
    await client.ReleaseLeases(
        scheduler_pb2.ReleaseLeasesRequest(deliverer_id="d1", lease_ids=[granted.lease_id])
    )
    (again,) = (await client.AcquireLeases(_acquire("d3"), timeout=10)).leases
    assert again.site_id == "mx.full.test"
    # ... and the site is full again: nothing for another caller.
    assert not (await client.AcquireLeases(_acquire("d4"), timeout=10)).leases


async def test_a_request_unanswered_in_time_fails_with_deadline_exceeded(
    client: SchedulerClient,
) -> None:
    (held,) = (await client.AcquireLeases(_acquire("d2"), timeout=10)).leases
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await client.AcquireLeases(_acquire("d1", wait=5), timeout=0.5)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The stream is still open and answering.
    renewed = await client.RenewLeases(
        scheduler_pb2.RenewLeasesRequest(deliverer_id="d2", lease_ids=[held.lease_id]),
        timeout=10,
    )
    assert [ls.lease_id for ls in renewed.leases] == [held.lease_id]


async def test_a_call_that_fails_inside_the_scheduler_is_answered_internal(
    client: SchedulerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(SchedulerServicer, "_renew", broken)
    (held,) = (await client.AcquireLeases(_acquire("d2"), timeout=10)).leases
    # Answered at once with INTERNAL, not left to run into its deadline...
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await client.RenewLeases(
            scheduler_pb2.RenewLeasesRequest(deliverer_id="d2", lease_ids=[held.lease_id]),
            timeout=60,
        )
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    assert "a bug" in (failed.value.details() or "")
    # ... and the stream goes on.
    assert not (await client.AcquireLeases(_acquire("d4"), timeout=10)).leases


async def test_a_stopped_scheduler_fails_the_requests_in_flight(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with (
        _scheduler(nats_server, tmp_path) as running,
        SchedulerClient(running.listen) as c,
    ):
        assert (await c.AcquireLeases(_acquire("d2"), timeout=10)).leases
        waiting = asyncio.ensure_future(c.AcquireLeases(_acquire("d1", wait=5), timeout=30))
        await asyncio.sleep(0.3)
        await running.stop()
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await asyncio.wait_for(waiting, 20)
        assert gone.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        # The next call opens a new stream, and fails too: nobody is listening.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await c.AcquireLeases(_acquire("d1"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
