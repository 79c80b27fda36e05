"""Failures: a deliverer killed with SIGKILL loses its leases and another finishes its work;
a restarted scheduler keeps adapted limits (KV) and no site goes over its limit meanwhile."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from sluice.devdns import DnsServer
from sluice.services import service
from sluice.v1 import scheduler_pb2, scheduler_pb2_grpc
from tests.api import blast
from tests.conftest import Stack, one_site, wait_for

SHAPING = '[domain."cap.test"]\nmax_connections = 3\n'


@pytest.fixture
def stack_overrides(tmp_path: Path) -> dict[str, dict[str, Any]]:
    shaping = tmp_path / "shaping.toml"
    shaping.write_text(SHAPING)
    return {
        "scheduler": {
            "shaping": str(shaping),
            "lease_ttl": "2s",
            "throttle_cooldown": "0s",
            "recover_after": 1000,
        },
        "deliverer": {"renew_interval": "200ms", "ack_wait": "3s", "fetch_batch": 4},
        "ingest": {"max_blast_recipients": 1000},
    }


@pytest.fixture
def stack_services() -> tuple[str, ...]:
    return ("ingest", "expander", "scheduler", "webhooks")  # deliverers come per test


@pytest.fixture(autouse=True)
def _mx(dns_server: DnsServer) -> None:
    one_site(dns_server, ["cap.test"], "mx.cap.test")


async def deliverer_process(
    stack: Stack, dns_port: int, smtp_port: int, extra_env: dict[str, str] | None = None
) -> Any:
    cfg = stack.cfg
    env = dict(
        os.environ,
        SLUICE_NATS__URL=cfg.nats.url,
        SLUICE_DELIVERER__SCHEDULER=cfg.scheduler.listen,
        SLUICE_DELIVERER__SMTP_PORT=str(smtp_port),
        SLUICE_DELIVERER__RENEW_INTERVAL="200ms",
        SLUICE_DELIVERER__IDLE_POLL="100ms",
        SLUICE_DELIVERER__FETCH_BATCH="4",
        SLUICE_SCHEDULER__LEASE_TTL="2s",
        SLUICE_DNS__NAMESERVERS="127.0.0.1",
        SLUICE_DNS__PORT=str(dns_port),
        SLUICE_RETRY__LADDER="1s",
    )
    env.update(extra_env or {})
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sluice.cli",
        "--log-level",
        "WARNING",
        "deliverer",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def test_sigkilled_deliverer_leases_expire_and_another_finishes(
    stack: Stack, dns_server: DnsServer, smtp: Any
) -> None:
    _, smtp_port = smtp
    stack.smtp.data_delay["cap.test"] = 0.02
    first = await deliverer_process(stack, dns_server.port, smtp_port)
    second = None
    try:
        await blast(stack, [f"u{i}@cap.test" for i in range(300)])
        await wait_for(lambda: len(stack.smtp.received) >= 40, 60, "the first deliverer working")
        first.send_signal(signal.SIGKILL)
        await first.wait()
        killed_at = len(stack.smtp.received)
        assert killed_at < 300, "the kill came too late to prove anything"
        second = await deliverer_process(stack, dns_server.port, smtp_port)
        await wait_for(
            lambda: len({r.rcpt_tos[0] for r in stack.smtp.received}) == 300,
            90,
            "the second deliverer to finish",
        )
    finally:
        for proc in (first, second):
            if proc is not None and proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                await proc.wait()
    assert stack.smtp.max_active <= 3
    # At-least-once: a message in flight at the kill may arrive twice, no more.
    assert len(stack.smtp.received) - 300 <= 3 * 4


async def test_restarted_scheduler_keeps_adapted_limits_and_the_cap(stack: Stack) -> None:
    stack.smtp.data_delay["cap.test"] = 0.02
    deliverer = asyncio.create_task(service("deliverer")(stack.cfg, stack.stop))
    try:
        stack.smtp.domain_reply["cap.test"] = "421 4.7.0 rate limited"
        await blast(stack, [f"t{i}@cap.test" for i in range(20)])

        async def limit() -> int:
            async with grpc.aio.insecure_channel(stack.cfg.scheduler.listen) as channel:
                stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
                resp = await stub.ListSites(
                    scheduler_pb2.ListSitesRequest(), wait_for_ready=True, timeout=10
                )
            return next(
                (s.current.max_connections for s in resp.sites if s.site_id == "mx.cap.test"), 3
            )

        await wait_for(lambda: _below(limit, 3), 30, "a throttled limit")
        throttled = await limit()
        stack.smtp.domain_reply.clear()
        await blast(stack, [f"u{i}@cap.test" for i in range(200)])
        await wait_for(lambda: len(stack.smtp.received) >= 20, 60, "delivery under way")
        # Restart the scheduler mid-run.
        stack.tasks[2].cancel()
        await asyncio.gather(stack.tasks[2], return_exceptions=True)
        stack.tasks[2] = asyncio.create_task(service("scheduler")(stack.cfg, stack.stop))
        assert await limit() == throttled, "adapted limits must survive a restart"
        await wait_for(
            lambda: len({r.rcpt_tos[0] for r in stack.smtp.received}) == 220,
            120,
            "all mail after the restart",
        )
        assert stack.smtp.max_active <= 3
    finally:
        deliverer.cancel()
        await asyncio.gather(deliverer, return_exceptions=True)


async def _below(limit: Any, cap: int) -> bool:
    return bool(await limit() < cap)


async def test_sigterm_drains_without_loss_or_duplicates(
    stack: Stack, dns_server: DnsServer, smtp: Any
) -> None:
    _, smtp_port = smtp
    stack.smtp.data_delay["cap.test"] = 0.05
    first = await deliverer_process(stack, dns_server.port, smtp_port)
    second = None
    try:
        await blast(stack, [f"u{i}@cap.test" for i in range(150)])
        await wait_for(lambda: len(stack.smtp.received) >= 20, 60, "delivery under way")
        first.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(first.wait(), 30)
        assert code == 0, "SIGTERM must exit cleanly after the transactions in hand"
        drained_at = len(stack.smtp.received)
        assert drained_at < 150, "the drain came too late to prove anything"
        second = await deliverer_process(stack, dns_server.port, smtp_port)
        await wait_for(lambda: len(stack.smtp.received) >= 150, 90, "the rest delivered")
        await asyncio.sleep(1.0)
    finally:
        for proc in (first, second):
            if proc is not None and proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                await proc.wait()
    recipients = [r.rcpt_tos[0] for r in stack.smtp.received]
    # Graceful: the transactions in hand were finished and acknowledged, the rest handed
    # back un-acked — every message exactly once.
    assert len(recipients) == len(set(recipients)) == 150


async def test_a_lease_that_cannot_be_renewed_ends_at_its_expiry(stack: Stack) -> None:
    stack.smtp.data_delay["cap.test"] = 0.05
    deliverer = asyncio.create_task(service("deliverer")(stack.cfg, stack.stop))
    try:
        await blast(stack, [f"u{i}@cap.test" for i in range(500)])
        await wait_for(lambda: len(stack.smtp.received) >= 10, 60, "delivery under way")
        # The scheduler goes away: nobody can renew, and the leases run out (2 s TTL).
        stack.tasks[2].cancel()
        await asyncio.gather(stack.tasks[2], return_exceptions=True)
        await asyncio.sleep(4.0)
        stopped_at = len(stack.smtp.received)
        await asyncio.sleep(2.0)
        assert len(stack.smtp.received) == stopped_at < 500, (
            "a deliverer kept delivering on a lease it could not renew"
        )
    finally:
        deliverer.cancel()
        await asyncio.gather(deliverer, return_exceptions=True)


async def test_mail_queued_behind_slow_transactions_stays_with_its_deliverer(
    stack: Stack, dns_server: DnsServer, smtp: Any
) -> None:
    # Each fetched batch (4 pointers) goes out one transaction after another, 1.2 s each:
    # the last ones wait longer than the 3 s ack_wait. They must not be redelivered to the
    # other deliverer meanwhile (a duplicate at the server).
    _, smtp_port = smtp
    stack.smtp.data_delay["cap.test"] = 1.2
    procs = [await deliverer_process(stack, dns_server.port, smtp_port) for _ in range(2)]
    try:
        await blast(stack, [f"h{i}@cap.test" for i in range(24)])
        await wait_for(lambda: len(stack.smtp.received) >= 24, 90, "every message")
        await asyncio.sleep(4.0)  # past one more ack_wait: a redelivered copy would show
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
    recipients = [r.rcpt_tos[0] for r in stack.smtp.received]
    assert len(recipients) == len(set(recipients)) == 24, sorted(recipients)


async def test_a_transaction_longer_than_ack_wait_is_kept_alive(
    stack: Stack, dns_server: DnsServer, smtp: Any
) -> None:
    """A DATA that takes 4.5 s, past the 3 s ack_wait: the deliverer tells JetStream the
    pointer is in progress, so it is not redelivered (to itself or the other deliverer)."""
    _, smtp_port = smtp
    stack.smtp.data_delay["cap.test"] = 4.5
    procs = [await deliverer_process(stack, dns_server.port, smtp_port) for _ in range(2)]
    try:
        await blast(stack, ["slow@cap.test"])
        await wait_for(lambda: stack.smtp.to("slow@cap.test"), 30, "the slow message")
        await asyncio.sleep(4.0)  # past one more ack_wait: a redelivered copy would show
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
    assert stack.smtp.rcpt_attempts["slow@cap.test"] == 1
    assert len(stack.smtp.to("slow@cap.test")) == 1


async def test_a_transaction_under_way_is_kept_alive_through_the_drain(
    stack: Stack, dns_server: DnsServer, smtp: Any
) -> None:
    """SIGTERM while a DATA's reply takes 9 s (three ack_waits): the draining deliverer
    waits for it and keeps the pointer in progress meanwhile, so the deliverer started in
    its place does not get it again (a second copy at the server)."""
    _, smtp_port = smtp
    stack.smtp.data_delay["cap.test"] = 9.0
    drain = {"SLUICE_SHUTDOWN__DRAIN_TIMEOUT": "14s"}
    first = await deliverer_process(stack, dns_server.port, smtp_port, drain)
    second = None
    try:
        await blast(stack, ["slow@cap.test"])
        await wait_for(lambda: stack.smtp.rcpt_attempts["slow@cap.test"] >= 1, 30, "the RCPT")
        await asyncio.sleep(0.5)  # (DATA under way)
        first.send_signal(signal.SIGTERM)
        second = await deliverer_process(stack, dns_server.port, smtp_port)
        assert await first.wait() == 0
        await wait_for(lambda: stack.smtp.to("slow@cap.test"), 30, "the slow message")
        await asyncio.sleep(10.0)  # a redelivered copy would reach its end of DATA by now
    finally:
        for proc in (first, second):
            if proc is not None and proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                await proc.wait()
    assert stack.smtp.rcpt_attempts["slow@cap.test"] == 1
    assert len(stack.smtp.to("slow@cap.test")) == 1
