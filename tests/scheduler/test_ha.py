"""Scheduler high availability: a leader lock in NATS KV picks one active scheduler; a
standby answers UNAVAILABLE, takes over when the active one is SIGKILLed, and waits out the
old leases first, so no site goes over its limit and no mail is lost."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from deliverer.schedclient import SchedulerClient
from scheduler.leader import ACTIVE_KEY, LeaderLock
from scheduler.server import Role, _lead
from scheduler.service import Scheduler
from scheduler.shaping import load_rules
from sluice import config as config_mod
from sluice import names
from sluice.config import Config
from sluice.devdns import DnsServer
from sluice.nats_layout import connect, ensure_layout
from sluice.natsserver import NatsServer, free_port
from sluice.resolver import Resolver
from sluice.v1 import scheduler_pb2, scheduler_pb2_grpc
from tests.api import blast
from tests.conftest import Stack, _listening, one_site, wait_for
from tests.scheduler.test_failures import deliverer_process

CAP = 3
SHAPING = f'[domain."cap.test"]\nmax_connections = {CAP}\n'
MESSAGES = 2000
LEASE_TTL = "3s"
LEADER_TTL = "2s"


# -- the lock alone --------------------------------------------------------------------


async def _js(nats_url: str) -> Any:
    cfg = config_mod.replace(Config(), nats={"url": nats_url})
    nc = await connect(cfg, "test-leader")
    await ensure_layout(nc.jetstream(), cfg)
    return nc


async def test_one_contender_wins_and_the_other_takes_over_once_renewals_stop(
    nats_server: NatsServer,
) -> None:
    nc = await _js(nats_server.url)
    try:
        js = nc.jetstream()
        a = LeaderLock(js, "a", ttl=2, lease_ttl=1.5)
        b = LeaderLock(js, "b", ttl=2, lease_ttl=1.5)
        assert await a.try_acquire()
        assert a.valid() and not a.took_over, "a fresh bucket: nobody was active before"
        assert not await b.try_acquire()
        assert b.seen_holder == "a" and not b.valid()
        # Renewals keep the lock beyond its TTL (8 x 0.5 s = twice the TTL): b never wins.
        for _ in range(8):
            assert await a.renew()
            assert not await b.try_acquire()
            await asyncio.sleep(0.5)
        # a stops renewing (as if SIGKILLed): b wins once the entry has expired.
        await wait_for(b.try_acquire, 30, "b to take over")
        assert not a.valid(), "two leaders at once: a still counted itself valid"
        assert b.valid()
        assert b.took_over, "a was active moments ago: b must wait out a's leases"
        assert not await a.renew(), "a's renewal must see that the lock is b's now"
        assert not a.valid()
        # Once b is gone too and the active marker has run out (ttl + drain), a contender
        # wins without a drain: no lease of anyone can still be in use.
        kv = await js.key_value(names.SCHEDULER_BUCKET)

        async def marker_gone() -> bool:
            try:
                await kv.get(ACTIVE_KEY)
                return False
            except Exception:
                return True

        await wait_for(marker_gone, 30, "the active marker to expire")
        c = LeaderLock(js, "c", ttl=2, lease_ttl=1.5)
        assert await c.try_acquire()
        assert not c.took_over
    finally:
        await nc.close()


async def test_a_winner_that_cannot_start_gives_the_lock_up_and_stands_by(
    nats_server: NatsServer,
) -> None:
    """Winning the lock and then failing to start (NATS failing over: reading the state
    timed out) must not end the scheduler's service: the lock goes back at once, for
    another contender or for this one's next try."""

    class CannotStart(Role):
        async def activate(self) -> Scheduler:
            raise TimeoutError("reading the scheduler's state timed out")

    nc = await _js(nats_server.url)
    try:
        js = nc.jetstream()
        cfg = config_mod.replace(Config(), nats={"url": nats_server.url})
        a = LeaderLock(js, "a", ttl=30, lease_ttl=30)
        role = CannotStart(cfg, js, a, load_rules(None), Resolver(cfg.dns))
        assert await a.try_acquire()
        # _lead returns (it does not raise, nor hold the lock while unable to serve).
        await asyncio.wait_for(_lead(cfg, js, role, asyncio.Event()), 10)
        assert role.active() is None and not a.valid()
        b = LeaderLock(js, "b", ttl=30, lease_ttl=30)
        assert await b.try_acquire(), "the lock was not given back"
    finally:
        await nc.close()


async def test_a_released_lock_passes_at_once_and_the_successor_drains(
    nats_server: NatsServer,
) -> None:
    nc = await _js(nats_server.url)
    try:
        js = nc.jetstream()
        a = LeaderLock(js, "a", ttl=30, lease_ttl=30)
        b = LeaderLock(js, "b", ttl=30, lease_ttl=30)
        assert await a.try_acquire()
        assert not await b.try_acquire()
        await a.release()
        assert not a.valid()
        # Without waiting for a TTL (30 s here): the release deleted the entry.
        assert await b.try_acquire()
        assert b.took_over
        assert not await a.renew()
    finally:
        await nc.close()


# -- two scheduler processes, two deliverer processes ------------------------------------


@pytest.fixture
def stack_overrides(tmp_path: Path) -> dict[str, dict[str, Any]]:
    shaping = tmp_path / "shaping.toml"
    shaping.write_text(SHAPING)
    return {
        "scheduler": {"shaping": str(shaping), "lease_ttl": LEASE_TTL},
        "ingest": {"max_blast_recipients": MESSAGES},
    }


@pytest.fixture
def stack_services() -> tuple[str, ...]:
    return ("ingest", "expander", "webhooks")  # schedulers and deliverers are processes


@pytest.fixture(autouse=True)
def _mx(dns_server: DnsServer) -> None:
    one_site(dns_server, ["cap.test"], "mx.cap.test")


async def scheduler_process(stack: Stack, listen: str, dns_port: int, log: Path) -> Any:
    env = dict(
        os.environ,
        SLUICE_NATS__URL=stack.cfg.nats.url,
        SLUICE_SCHEDULER__LISTEN=listen,
        SLUICE_SCHEDULER__SHAPING=stack.cfg.scheduler.shaping,
        SLUICE_SCHEDULER__LEASE_TTL=LEASE_TTL,
        SLUICE_SCHEDULER__LEADER_TTL=LEADER_TTL,
        SLUICE_SCHEDULER__BACKLOG_INTERVAL="200ms",
        SLUICE_DNS__NAMESERVERS="127.0.0.1",
        SLUICE_DNS__PORT=str(dns_port),
    )
    with await asyncio.to_thread(open, log, "ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sluice.cli",
            "scheduler",
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=out,
        )


async def status(address: str) -> tuple[grpc.StatusCode, str]:
    """How a scheduler answers ListSites: OK when active."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        try:
            await stub.ListSites(scheduler_pb2.ListSitesRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def _active(address: str) -> bool:
    return (await status(address))[0] == grpc.StatusCode.OK


async def test_standby_takes_over_from_a_sigkilled_scheduler_within_the_cap(
    stack: Stack, dns_server: DnsServer, smtp: Any, tmp_path: Path
) -> None:
    _, smtp_port = smtp
    stack.smtp.data_delay["cap.test"] = 0.01
    first, second = stack.cfg.scheduler.listen, f"127.0.0.1:{free_port()}"
    procs: list[Any] = []
    try:
        procs.append(await scheduler_process(stack, first, dns_server.port, tmp_path / "s1.log"))
        await wait_for(lambda: _active(first), 30, "the first scheduler to be active")
        procs.append(await scheduler_process(stack, second, dns_server.port, tmp_path / "s2.log"))
        await wait_for(lambda: _listening(second), 30, "the second scheduler to listen")
        code, details = await status(second)
        assert code == grpc.StatusCode.UNAVAILABLE and "standby" in details, details
        # A standby grants nothing, to anyone.
        async with grpc.aio.insecure_channel(second) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await scheduler_pb2_grpc.SchedulerServiceStub(channel).AcquireLeases(
                    scheduler_pb2.AcquireLeasesRequest(deliverer_id="probe", max_leases=4),
                    timeout=5,
                )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        # The standby is listed first: the deliverers fail over to the active one at once.
        env = {"SLUICE_DELIVERER__SCHEDULER": f"{second},{first}"}
        deliverers = [
            await deliverer_process(stack, dns_server.port, smtp_port, env) for _ in range(2)
        ]
        procs += deliverers
        await blast(stack, [f"u{i}@cap.test" for i in range(MESSAGES)])
        await wait_for(lambda: len(stack.smtp.received) >= 300, 120, "delivery under way")
        procs[0].send_signal(signal.SIGKILL)
        await procs[0].wait()
        killed_at = len(stack.smtp.received)
        assert killed_at < MESSAGES, "the kill came too late to prove anything"
        await wait_for(lambda: _active(second), 60, "the standby to take over")
        await wait_for(
            lambda: len({r.rcpt_tos[0] for r in stack.smtp.received}) == MESSAGES,
            180,
            "every message delivered after the takeover",
        )
        # Let anything that would arrive twice arrive before counting.
        await asyncio.sleep(1.0)
        assert all(p.returncode is None for p in procs[1:]), "a survivor died"
    finally:
        for p in procs:
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                await asyncio.wait_for(p.wait(), 30)
            except TimeoutError:
                p.kill()
                await p.wait()
    recipients = [r.rcpt_tos[0] for r in stack.smtp.received]
    assert set(recipients) == {f"u{i}@cap.test" for i in range(MESSAGES)}, "mail was lost"
    # The deliverers never died, so every transaction was settled (acknowledged) by the one
    # that ran it, and mail in hand on a lease that was lost went back unsent: exactly once.
    # (Only a deliverer dying between DATA and the ack repeats a message; see test_failures.)
    duplicates = len(recipients) - len(set(recipients))
    assert duplicates == 0, f"{duplicates} messages arrived twice"
    # The cap held all along: while the old leader's leases ran out, the new one granted
    # nothing (it waited 4/3 lease TTL before its first grant).
    assert stack.smtp.max_active <= CAP, f"{stack.smtp.max_active} connections at once"


async def test_the_client_raises_unavailable_when_no_scheduler_answers() -> None:
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    async with SchedulerClient(",".join(dead)) as client:
        assert client.addresses == dead
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await client.AcquireLeases(
                scheduler_pb2.AcquireLeasesRequest(deliverer_id="probe"), timeout=5
            )
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
