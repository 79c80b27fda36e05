"""The backlog as the scheduler reads it from the MAIL stream (a real nats-server): messages
per queue (a dedicated lane's domain, or a whole hash bucket, per tier and tenant), per
(tier, domain key), and the domain keys with mail in buckets; the sites of bucket mail (a
real DNS server)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from scheduler import service as service_mod
from scheduler.backlog import Queue, read_backlog
from sluice import config as config_mod
from sluice import names
from sluice.config import Config
from sluice.devdns import DnsServer
from sluice.nats_layout import connect, ensure_layout
from sluice.natsserver import NatsServer
from sluice.resolver import DnsError, MxHost, Resolver
from sluice.v1 import messages_pb2
from tests.conftest import one_site, running_scheduler, scheduler_config, wait_for

BULK = messages_pb2.TIER_BULK
CRITICAL = messages_pb2.TIER_CRITICAL


def _config(
    nats_server: NatsServer, dns_server: DnsServer, dns_timeout: str, **scheduler: Any
) -> Config:
    """A configuration with the test DNS server (lookups time out after dns_timeout), and
    some [scheduler] keys."""
    return scheduler_config(
        nats_server, dns_server.port, dns={"timeout": dns_timeout}, scheduler=scheduler
    )


async def test_backlog_per_queue_domain_and_bucket(nats_server: NatsServer) -> None:
    cfg = config_mod.replace(Config(), nats={"url": nats_server.url})
    nc = await connect(cfg, "test")
    try:
        js = nc.jetstream()
        await ensure_layout(js, cfg)
        sends = [
            (BULK, "d", "big_test", "acme", 3),
            (CRITICAL, "d", "big_test", "acme", 1),
            (BULK, "b01", "a_test", "acme", 2),
            (BULK, "b01", "b_test", "acme", 1),
            (BULK, "b01", "a_test", "other", 4),
            (BULK, "b02", "c_test", "acme", 1),
        ]
        for tier, lane, key, tenant, n in sends:
            for _ in range(n):
                await js.publish(names.mail_subject(tier, lane, key, tenant), b"x")
        backlog = await read_backlog(js)
        assert backlog.queues == {
            Queue(BULK, "d", "big_test", "acme"): 3,
            Queue(CRITICAL, "d", "big_test", "acme"): 1,
            Queue(BULK, "b01", "", "acme"): 3,
            Queue(BULK, "b01", "", "other"): 4,
            Queue(BULK, "b02", "", "acme"): 1,
        }
        assert dict(backlog.domains) == {
            (BULK, "big_test"): 3,
            (CRITICAL, "big_test"): 1,
            (BULK, "a_test"): 6,
            (BULK, "b_test"): 1,
            (BULK, "c_test"): 1,
        }
        assert backlog.bucketed == {"a_test", "b_test", "c_test"}
        # A second read gives equal queues (made once, reused).
        again = await read_backlog(js)
        assert again.queues == backlog.queues
        assert all(a is b for a, b in zip(again.queues, backlog.queues, strict=True))
    finally:
        await nc.close()


async def test_the_sites_of_bucket_mail(
    nats_server: NatsServer, dns_server: DnsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Domains with mail in hash buckets, by site: two domains of one MX host are one site, a
    domain without DNS is its own; a later read with the same domains looks nothing up."""
    one_site(dns_server, ["a.test", "b.test"], "mx.shared.test")
    one_site(dns_server, ["c.test"], "mx.c.test")
    async with running_scheduler(_config(nats_server, dns_server, "2s"), start=False) as scheduler:
        js = scheduler._js
        for lane, key in (
            ("b01", "a_test"),
            ("b02", "b_test"),
            ("b03", "c_test"),
            ("b04", "gone_test"),
        ):
            await js.publish(names.mail_subject(BULK, lane, key, "acme"), b"x")
        await js.publish(names.mail_subject(BULK, "d", "big_test", "acme"), b"x")
        await scheduler.refresh_backlog()
        # Nothing is looked up for them under the scheduler's lock: sites not known yet
        # are left out, until run_backlog has looked up the backlog's new domains.
        before = len(dns_server.queries)
        assert scheduler._bucketed_sites() == set()
        assert len(dns_server.queries) == before
        unresolved = {"a.test", "b.test", "c.test", "gone.test", "big.test"}
        assert scheduler._unresolved() == unresolved
        # Sites learnt later join the same read's set (one lookup now, the rest after).
        await scheduler._resolve({"c.test"})
        assert scheduler._bucketed_sites() == {await scheduler.site_of("c.test")}
        await scheduler._resolve(scheduler._unresolved())
        assert {name for name, _ in dns_server.queries[before:]} == unresolved
        sites = scheduler._bucketed_sites()
        shared = await scheduler.site_of("a.test")
        assert shared == await scheduler.site_of("b.test")
        assert sites == {shared, await scheduler.site_of("c.test"), "gone.test"}
        looked_up = len(dns_server.queries)
        await scheduler.refresh_backlog()
        assert scheduler._unresolved() == set()
        assert scheduler._bucketed_sites() == sites
        assert len(dns_server.queries) == looked_up
        # The same read, later: sites that have expired are to be looked up again, though
        # the read was gone through before they expired.
        assert scheduler._unresolved() == set()
        later = time.monotonic() + 3600
        with monkeypatch.context() as m:  # (time.monotonic itself: undone at once)
            m.setattr("scheduler.service.time.monotonic", lambda: later)
            assert scheduler._unresolved() == unresolved


async def test_calls_do_not_wait_for_the_lookups_of_a_new_backlog(
    nats_server: NatsServer, dns_server: DnsServer
) -> None:
    """The sites of a new backlog's domains are looked up beside the scheduler's lock: a
    call for work is answered while a lookup is still unanswered (a long tail is thousands
    of them, and calls waiting for them ran past their deadlines)."""
    dns_server.silent.add("slow.test")
    async with running_scheduler(_config(nats_server, dns_server, "3s"), start=False) as scheduler:
        await scheduler._js.publish(names.mail_subject(BULK, "b01", "slow_test", "acme"), b"x")
        await scheduler.refresh_backlog()
        assert scheduler._unresolved() == {"slow.test"}
        resolving = asyncio.create_task(scheduler._resolve(scheduler._unresolved()))
        await wait_for(lambda: ("slow.test", "MX") in dns_server.queries, 10, "the lookup")
        leases = await scheduler.acquire("d1", 10)
        assert not resolving.done(), "the call waited for the unanswered lookup"
        assert [lease.lane for lease in leases] == ["b01"]  # (its lane is worked meanwhile)
        await resolving
        assert scheduler._unresolved() == set()  # (a failed lookup: a site of its own)


class _CountingResolver(Resolver):
    """The real resolver, counting its MX lookups (and those in flight)."""

    def __init__(self, cfg: config_mod.DnsConfig) -> None:
        super().__init__(cfg)
        self.in_flight = self.most = self.calls = 0

    async def mx_many(
        self, domains: list[str]
    ) -> AsyncIterator[list[tuple[str, list[MxHost] | DnsError]]]:
        self.calls += len(domains)
        self.in_flight += len(domains)
        self.most = max(self.most, self.in_flight)
        left = len(domains)
        try:
            await asyncio.sleep(0.01)  # (answers take a while: lookups pile up)
            async for came in super().mx_many(domains):
                left -= len(came)
                self.in_flight -= len(came)
                yield came
        finally:
            self.in_flight -= left


async def test_lookups_in_flight_are_capped_across_callers(
    nats_server: NatsServer, dns_server: DnsServer
) -> None:
    """The backlog loop's lookups and a deliverer's call share one cap on lookups in flight
    (the nameserver drops what it cannot answer, and a failed lookup makes a domain its own
    site, with a limit of its own)."""
    cfg = _config(nats_server, dns_server, "3s")
    resolver = _CountingResolver(cfg.dns)
    async with running_scheduler(cfg, resolver=resolver, start=False) as scheduler:
        backlog = {f"b{i}.test" for i in range(300)}
        calls = [[f"c{n}x{i}.test" for i in range(100)] for n in range(6)]
        await asyncio.gather(
            scheduler._resolve(backlog),
            *(scheduler._acquire_domains(f"d{n}", call, 1) for n, call in enumerate(calls)),
        )
        # (seven callers, 900 domains: as many in flight as the cap lets)
        assert resolver.most == service_mod._IN_FLIGHT, resolver.most
        assert all(scheduler._known_site(d) is not None for d in backlog.union(*calls))
        assert resolver.calls == len(backlog) + 600  # (each domain looked up once)


async def test_a_silent_domain_does_not_hold_back_the_sites_of_the_others(
    nats_server: NatsServer, dns_server: DnsServer
) -> None:
    """The domains looked up together are settled as their answers come: one whose
    nameserver never answers holds back neither the others' sites nor a caller that waits
    for one of them."""
    dns_server.silent.add("silent.test")
    others = {f"o{i}.test" for i in range(10)}
    async with running_scheduler(_config(nats_server, dns_server, "3s"), start=False) as scheduler:
        resolving = asyncio.create_task(scheduler._resolve({"silent.test", *others}))
        await wait_for(
            lambda: all(scheduler._known_site(d) is not None for d in others), 2, "the others"
        )
        assert await scheduler.site_of("o1.test") == "o1.test"  # (no such domain: its own)
        assert not resolving.done(), "the silent domain's lookup already ended"
        assert "silent.test" in scheduler._looking_up
        await resolving
        assert scheduler._known_site("silent.test") is not None  # (failed: held back)
        assert "silent.test" in scheduler._unknown


async def test_a_failed_lookup_makes_no_site_of_its_own(
    nats_server: NatsServer, dns_server: DnsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lookup that fails for a moment does not make a domain a site of its own (with a
    limit of its own, its connections went to its provider's MX hosts on top of that site's
    limit): a known domain keeps the site found last; a new one gets no lease until its
    lookups have failed for lookup_grace, then it is its own site (its mail must still be
    tried, and deferred by the deliverer); once a lookup works, its real site. A domain that
    does not exist is its own site at once."""
    one_site(dns_server, ["a.test", "b.test", "c.test"], "mx.shared.test")
    # (failed entries expire sooner than a failed lookup takes: they must count from its end)
    monkeypatch.setattr(service_mod, "_RETRY_LOOKUP", 0.4)
    cfg = _config(nats_server, dns_server, "0.6s", lookup_grace="1s")
    resolver = _CountingResolver(cfg.dns)
    async with running_scheduler(cfg, resolver=resolver, start=False) as scheduler:

        def forget(domain: str) -> None:  # (both caches expired: the next call looks it up)
            key = names.domain_key_of(domain)
            scheduler._sites[key] = (0.0, scheduler._sites[key][1])
            resolver._mx.pop(domain, None)

        shared = await scheduler.site_of("a.test")
        assert shared != "a.test"
        dns_server.silent.update({"a.test", "b.test", "c.test"})
        forget("a.test")
        resp = await scheduler.acquire_domains("d1", ["a.test"])
        assert resp.domain_sites["a.test"] == shared
        assert [lease.site_id for lease in resp.leases] == [shared]

        looked_up = resolver.calls
        resp = await scheduler.acquire_domains("d2", ["b.test"])
        assert resp.domain_sites["b.test"] == "b.test"
        assert not resp.leases, "a lease for a domain whose site is not known"
        assert resolver.calls == looked_up + 1, "looked up again under the lock"
        assert scheduler._known_site("b.test") == "b.test"
        dns_server.silent.discard("b.test")
        forget("b.test")
        assert await scheduler.site_of("b.test") == shared
        assert "b.test" not in {*scheduler._failing, *scheduler._unknown}
        assert not scheduler._holding("b.test", ["b.test"], time.monotonic())

        resp = await scheduler.acquire_domains("d2", ["c.test"])
        assert not resp.leases
        await asyncio.sleep(1.0)
        forget("c.test")
        resp = await scheduler.acquire_domains("d2", ["c.test"])
        assert [lease.site_id for lease in resp.leases] == ["c.test"]

        resp = await scheduler.acquire_domains("d2", ["gone.test"])
        assert [lease.site_id for lease in resp.leases] == ["gone.test"]

        # Out of the backlog, failures are forgotten: back in it, c.test is new again.
        await scheduler.refresh_backlog()
        scheduler._forget_failures()
        assert "c.test" not in {*scheduler._failing, *scheduler._unknown}
        assert names.domain_key_of("c.test") not in scheduler._sites
        resp = await scheduler.acquire_domains("d2", ["c.test"])
        assert not resp.leases


async def test_the_backlog_is_read_once_an_interval_by_the_loop_or_a_call(
    nats_server: NatsServer, dns_server: DnsServer
) -> None:
    """Calls for work read a stale backlog themselves; the backlog loop then skips its own
    read and waits an interval from theirs (with a long tail each read is thousands of
    subjects, for nats-server and for the scheduler; both reading made two an interval)."""
    cfg = _config(nats_server, dns_server, "3s", backlog_interval="200ms")
    async with running_scheduler(cfg, start=False) as scheduler:
        await scheduler._js.publish(names.mail_subject(BULK, "d", "big_test", "acme"), b"x")
        reads: list[float] = []
        refresh = scheduler.refresh_backlog

        async def counted() -> None:
            reads.append(time.monotonic())
            await refresh()

        scheduler.refresh_backlog = counted  # type: ignore[method-assign]
        stop = asyncio.Event()
        loop = asyncio.create_task(scheduler.run_backlog(stop))
        try:
            start = time.monotonic()
            while time.monotonic() - start < 2.0:  # calls every 10 ms for 2 s
                await scheduler.acquire("d1", 10)
                await asyncio.sleep(0.01)
            took = time.monotonic() - start
            with_calls = len(reads)
            # Then no calls for a second: the loop alone keeps the backlog fresh.
            await asyncio.sleep(1.0)
            alone = len(reads) - with_calls
        finally:
            stop.set()
            await loop
        # One read an interval (the first at once), and some slack for a busy machine.
        assert with_calls <= took / 0.2 + 3, (with_calls, took)
        gaps = [b - a for a, b in itertools.pairwise(reads)]
        assert min(gaps) >= 0.1 - 0.01, gaps  # never two reads within half an interval
        assert alone >= 2, alone  # (five intervals: at least two reads, on a slow machine)


async def test_a_big_backlog_is_read_again_when_mail_was_stored_or_its_counts_are_old(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backlog of _BIG_BACKLOG subjects or more is read again at once when mail was stored
    since the last read; otherwise (counts can only have fallen) only once that read is
    _RECOUNT old, and a queue released with nothing ready waits that long to be handed out
    again. A small backlog is read every time."""
    monkeypatch.setattr(service_mod, "_BIG_BACKLOG", 3)
    monkeypatch.setattr(service_mod, "_RECOUNT", 1.0)
    cfg = scheduler_config(nats_server, scheduler={"backlog_interval": "0.1s"})
    async with running_scheduler(cfg, start=False) as scheduler:
        js = scheduler._js

        def subject(lane: str, key: str) -> str:
            return names.mail_subject(BULK, lane, key, "acme")

        async def take(lane: str, key: str) -> None:  # (its mail gone, as if delivered)
            await js.purge_stream(names.MAIL_STREAM, subject=subject(lane, key))

        for key in ("a_test", "b_test", "c_test"):
            await js.publish(subject("b01", key), b"x")
        await scheduler.refresh_backlog()
        keys = {(BULK, k) for k in ("a_test", "b_test", "c_test")}
        assert set(scheduler._backlog.domains) == keys
        read_at = time.monotonic()

        await take("b01", "a_test")
        await scheduler.refresh_backlog()
        assert (BULK, "a_test") in scheduler._backlog.domains, "nothing stored: not read"
        # A lane released with nothing ready is not handed out again until the counts are
        # read again (not just for backlog_interval).
        (lane,) = await scheduler.acquire("d1", 10)
        scheduler.release("d1", [lane.lease_id])
        assert scheduler._cooldown[lane.site_id] >= read_at + 1.0 - 0.05

        await js.publish(subject("b02", "d_test"), b"x")
        await scheduler.refresh_backlog()
        domains = set(scheduler._backlog.domains)
        assert (BULK, "d_test") in domains and (BULK, "a_test") not in domains, "mail stored"

        await take("b01", "b_test")
        await scheduler.refresh_backlog()
        assert (BULK, "b_test") in scheduler._backlog.domains
        await asyncio.sleep(1.1)
        await scheduler.refresh_backlog()
        assert (BULK, "b_test") not in scheduler._backlog.domains, "read again once old"

        # Two subjects now: a small backlog, read every time.
        assert scheduler._backlog.subjects == 2
        await take("b01", "c_test")
        await scheduler.refresh_backlog()
        assert (BULK, "c_test") not in scheduler._backlog.domains
        assert scheduler._counts_until() == 0.0
