"""Who gets which lease when deliverers ask for work: hash-bucket lanes take none of a
deliverer's lease slots (`max_leases` counts site leases), and a site's second lease goes to
another deliverer that asked for work lately rather than to the holder of the first. (A real
Scheduler on a real nats-server, sites from a real DNS server.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from scheduler.service import Scheduler
from sluice import names
from sluice.devdns import DnsServer
from sluice.natsserver import NatsServer
from sluice.v1 import messages_pb2, scheduler_pb2
from tests.conftest import one_site, running_scheduler, scheduler_config

BULK = messages_pb2.TIER_BULK
LANES = [f"b{i:02d}" for i in range(4)]
# Three domains with their own queues, each on its own site of 5 connections.
BUSY = ["a.busy.test", "b.busy.test", "c.busy.test"]


@pytest.fixture
async def scheduler(
    nats_server: NatsServer, dns_server: DnsServer, tmp_path: Path
) -> AsyncIterator[Scheduler]:
    """A started Scheduler and no mail yet (see _fill)."""
    for domain in BUSY:
        one_site(dns_server, [domain], f"mx.{domain}")
    shaping = tmp_path / "shaping.toml"
    shaping.write_text("[default]\nmax_connections = 5\n")
    cfg = scheduler_config(nats_server, dns_server.port, scheduler={"lease_ttl": "30s"})
    async with running_scheduler(cfg, shaping=shaping) as s:
        yield s


async def _fill(scheduler: Scheduler) -> None:
    """Mail on every lane and in each busy domain's own queue; the backlog read, and the
    busy domains' sites looked up (as the backlog loop does)."""
    js = scheduler._js
    for lane in LANES:
        await js.publish(names.mail_subject(BULK, lane, "mail_test", "acme"), b"p")
    for domain in BUSY:
        key = names.domain_key(domain)
        await js.publish(names.mail_subject(BULK, names.DEDICATED_LANE, key, "acme"), b"p")
    await scheduler.refresh_backlog()
    await scheduler._resolve(scheduler._unresolved())


def _kinds(leases: list[scheduler_pb2.Lease]) -> tuple[list[str], list[str]]:
    """(the lanes, the sites) of granted leases."""
    return sorted(ls.lane for ls in leases if ls.lane), sorted(
        ls.site_id for ls in leases if not ls.lane
    )


async def test_lanes_take_no_lease_slots(scheduler: Scheduler) -> None:
    """With room for two leases a lone deliverer gets every lane and two sites: counted
    against its slots, the lanes (which come first) took them all, and a long tail's
    busiest domains waited for the lanes to drain."""
    await _fill(scheduler)
    lanes, sites = _kinds(await scheduler.acquire("d1", 2))
    assert lanes == LANES
    assert sites == sorted(f"mx.{d}" for d in BUSY)[:2]
    # At its max_leases it asks for lanes only: none left, and no site lease either.
    assert await scheduler.acquire("d1", 0) == []
    lanes, sites = _kinds(await scheduler.acquire("d1", 1))
    assert lanes == [] and len(sites) == 1


async def test_a_lone_deliverer_takes_both_halves_of_a_site(scheduler: Scheduler) -> None:
    await _fill(scheduler)
    first = await scheduler.acquire("d1", 16)
    _, sites = _kinds(first)
    assert sites == sorted(f"mx.{d}" for d in BUSY)
    assert {ls.max_connections for ls in first if not ls.lane} == {3}, "half, rounded up"
    second = await scheduler.acquire("d1", 16)
    assert _kinds(second) == ([], sites), "nobody else asked: the other halves too"
    assert {ls.max_connections for ls in second} == {2}


async def test_a_sites_second_half_is_left_for_another_deliverer(scheduler: Scheduler) -> None:
    """d2 asked for work lately, with room, and found none; then mail came. d1 holds half
    of each site after its first call, and its next call leaves the other halves to d2
    (before, the first to ask took both halves of every site it had slots for, and with
    enough slots the other deliverer idled)."""
    assert await scheduler.acquire("d2", 16) == []
    await _fill(scheduler)
    _, sites = _kinds(await scheduler.acquire("d1", 16))
    assert sites == sorted(f"mx.{d}" for d in BUSY)
    assert _kinds(await scheduler.acquire("d1", 16)) == ([], []), "left for d2"
    _, sites = _kinds(await scheduler.acquire("d2", 16))
    assert sites == sorted(f"mx.{d}" for d in BUSY)
    assert {scheduler.leases.in_use(f"mx.{d}") for d in BUSY} == {5}


async def test_a_busy_deliverer_leaves_both_halves_to_the_holder(scheduler: Scheduler) -> None:
    """d2 asked lately but had no room (it asks for lanes only): d1 may take the other
    halves itself."""
    assert await scheduler.acquire("d2", 0) == []
    await _fill(scheduler)
    assert len(_kinds(await scheduler.acquire("d1", 16))[1]) == len(BUSY)
    assert len(_kinds(await scheduler.acquire("d1", 16))[1]) == len(BUSY)
    assert {scheduler.leases.in_use(f"mx.{d}") for d in BUSY} == {5}
