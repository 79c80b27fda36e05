"""Seeded SIGKILLs of deliverer processes at random moments: in every run each accepted
message ends delivered or dead-lettered (bounces), none is lost, none is stuck in MAIL."""

from __future__ import annotations

import random
import signal
from typing import Any

import pytest

from sluice import deadletters
from sluice.nats_layout import connect
from tests.api import blast
from tests.conftest import Stack, wait_for
from tests.scheduler.test_failures import deliverer_process

SEEDS = (11, 22, 33, 44, 55)
GOOD, BOUNCE, LATER = 120, 20, 20


@pytest.fixture
def stack_overrides() -> dict[str, dict[str, Any]]:
    return {
        "scheduler": {"lease_ttl": "2s"},
        "deliverer": {"renew_interval": "200ms", "ack_wait": "3s", "fetch_batch": 4},
        "ingest": {"max_blast_recipients": 1000},
    }


@pytest.fixture
def stack_services() -> tuple[str, ...]:
    return ("ingest", "expander", "scheduler", "webhooks")  # deliverers are processes here


async def _stored(stack: Stack) -> int:
    nc = await connect(stack.cfg, "test-mail")
    try:
        info = await nc.jetstream().stream_info("MAIL")
        return info.state.messages
    finally:
        await nc.close()


async def _dead(stack: Stack) -> set[str]:
    nc = await connect(stack.cfg, "test-dlq")
    try:
        entries, _ = await deadletters.list_page(nc.jetstream(), stack.tenant_id, 10_000)
    finally:
        await nc.close()
    return {dl.pointer.recipient for _, _, dl in entries}


async def test_sigkill_at_random_moments_loses_nothing(
    stack: Stack, dns_server: Any, smtp: Any
) -> None:
    _, smtp_port = smtp
    stack.smtp.data_delay["mail.test"] = 0.01
    # Every attempt at other.test bounces (a kill mid-bounce must still end in a dead letter).
    stack.smtp.domain_reply["other.test"] = "550 5.1.1 No such user"
    procs = [await deliverer_process(stack, dns_server.port, smtp_port) for _ in range(2)]
    kills = 0
    try:
        for seed in SEEDS:
            rng = random.Random(seed)
            good = [f"r{seed}g{i}@mail.test" for i in range(GOOD)]
            bounce = [f"r{seed}b{i}@other.test" for i in range(BOUNCE)]
            later = [f"r{seed}l{i}@mail.test" for i in range(LATER)]
            for e in later:
                stack.smtp.script[e] = ["451 4.3.0 Try again later"]
            emails = good + bounce + later
            rng.shuffle(emails)
            before = len(stack.smtp.received)
            await blast(stack, emails)
            for _ in range(2):  # two kills per run, each at a random point of the delivery
                target = before + rng.randint(5, GOOD)
                await wait_for(
                    lambda t=target: len(stack.smtp.received) >= t, 60, "deliveries under way"
                )
                victim = rng.randrange(len(procs))
                procs[victim].send_signal(signal.SIGKILL)
                await procs[victim].wait()
                kills += 1
                procs[victim] = await deliverer_process(stack, dns_server.port, smtp_port)
            await wait_for(
                lambda g=good, la=later: set(g + la) <= _delivered(stack),
                90,
                f"run {seed} delivered",
            )
            await wait_for(lambda b=bounce: _has(stack, b), 30, f"run {seed} dead letters")
            await wait_for(lambda: _empty(stack), 30, f"run {seed}: MAIL empty")
            dead = await _dead(stack)
            run = set(emails)
            assert not (set(good + later) & dead), "a deliverable message was dead-lettered"
            assert not (set(bounce) & _delivered(stack)), "a bounced message was delivered"
            assert (_delivered(stack) | dead) & run == run
    finally:
        for p in procs:
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
                await p.wait()
    assert kills == 2 * len(SEEDS)


async def _has(stack: Stack, bounce: list[str]) -> bool:
    return set(bounce) <= await _dead(stack)


async def _empty(stack: Stack) -> bool:
    return await _stored(stack) == 0


def _delivered(stack: Stack) -> set[str]:
    return {r.rcpt_tos[0] for r in stack.smtp.received}
