"""The scheduler's policy: group backlog into sites and grant leases, critical first."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, defaultdict

from google.protobuf.timestamp_pb2 import Timestamp
from nats.js import JetStreamContext

from scheduler.backlog import Queue, ensure_consumer, read_backlog
from scheduler.leases import LeaseState, LeaseTable
from scheduler.shaping import Rules
from sluice.config import Config
from sluice.resolver import DnsError, Resolver
from sluice.v1 import scheduler_pb2

__all__ = ["Scheduler"]

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, cfg: Config, js: JetStreamContext, rules: Rules, resolver: Resolver) -> None:
        self._cfg = cfg
        self._js = js
        self._rules = rules
        self._resolver = resolver
        self.leases = LeaseTable(cfg.scheduler.lease_ttl)
        self._backlog: dict[Queue, int] = {}
        self._backlog_at = 0.0
        self._sites: dict[str, tuple[float, str]] = {}
        self._cooldown: dict[str, float] = {}
        self.outcomes: Counter[tuple[str, int]] = Counter()
        self._lock = asyncio.Lock()

    async def refresh_backlog(self) -> None:
        self._backlog = await read_backlog(self._js)
        self._backlog_at = time.monotonic()

    async def site_of(self, domain: str) -> str:
        now = time.monotonic()
        hit = self._sites.get(domain)
        if hit and hit[0] > now:
            return hit[1]
        try:
            hosts = [h.host for h in await self._resolver.mx(domain)]
            site = self._rules.site_of(domain, hosts)
            ttl = 300.0
        except DnsError as exc:
            # The deliverer meets the same failure and classifies it; the domain is its own site.
            log.info("site of %s unknown (%s)", domain, exc)
            site, ttl = domain, 30.0
        self._sites[domain] = (now + ttl, site)
        return site

    async def acquire(self, deliverer_id: str, max_leases: int) -> list[scheduler_pb2.Lease]:
        async with self._lock:
            if time.monotonic() - self._backlog_at > self._cfg.scheduler.backlog_interval:
                await self.refresh_backlog()
            by_site: dict[str, list[Queue]] = defaultdict(list)
            for q in self._backlog:
                by_site[await self.site_of(q.domain)].append(q)
            held = {ls.site_id for ls in self.leases.held_by(deliverer_id)}
            now = time.monotonic()
            # Sites whose best queue is the highest tier come first.
            order = sorted(by_site, key=lambda s: min(q.tier for q in by_site[s]))
            granted: list[scheduler_pb2.Lease] = []
            for site in order:
                if len(granted) >= max_leases:
                    break
                if site in held or self._cooldown.get(site, 0.0) > now:
                    continue
                queues = sorted(by_site[site], key=lambda q: (q.tier, q.key))
                domains = sorted({q.domain for q in queues})
                limits = self._rules.limits(site, domains)
                lease = self.leases.grant(site, deliverer_id, limits, domains)
                if lease is None:
                    continue
                granted.append(await self._to_proto(lease, queues))
                log.info(
                    "lease %s: site=%s deliverer=%s connections=%d domains=%d",
                    lease.lease_id,
                    site,
                    deliverer_id,
                    lease.connections,
                    len(domains),
                )
            return granted

    async def _to_proto(self, lease: LeaseState, queues: list[Queue]) -> scheduler_pb2.Lease:
        lq = [
            scheduler_pb2.LeaseQueue(
                tier=q.tier, key=q.key, consumer=await ensure_consumer(self._js, self._cfg, q)
            )
            for q in queues
        ]
        return self.describe(lease, lq)

    @staticmethod
    def describe(
        lease: LeaseState, queues: list[scheduler_pb2.LeaseQueue] | None = None
    ) -> scheduler_pb2.Lease:
        expires = Timestamp()
        expires.FromNanoseconds(int(lease.expires_at * 1e9))
        return scheduler_pb2.Lease(
            lease_id=lease.lease_id,
            site_id=lease.site_id,
            domains=lease.domains,
            queues=queues or [],
            max_connections=lease.connections,
            max_message_rate=lease.limits.max_message_rate,
            max_deliveries_per_connection=lease.limits.max_deliveries_per_connection,
            expires_at=expires,
        )

    def renew(self, deliverer_id: str, lease_ids: list[str]) -> scheduler_pb2.RenewLeasesResponse:
        resp = scheduler_pb2.RenewLeasesResponse()
        for lease_id in lease_ids:
            ls = self.leases.renew(deliverer_id, lease_id)
            if ls is None:
                resp.lost_lease_ids.append(lease_id)
            else:
                resp.leases.append(self.describe(ls))
        return resp

    def release(self, deliverer_id: str, lease_ids: list[str]) -> None:
        for lease_id in lease_ids:
            for ls in self.leases.all():
                if ls.lease_id == lease_id and ls.deliverer_id == deliverer_id:
                    # A released site had nothing ready; do not hand it straight back.
                    self._cooldown[ls.site_id] = (
                        time.monotonic() + self._cfg.scheduler.backlog_interval
                    )
            self.leases.release(deliverer_id, lease_id)

    def report(self, outcomes: list[scheduler_pb2.Outcome]) -> None:
        for o in outcomes:
            self.outcomes[(o.site_id, o.kind)] += 1

    async def run_backlog(self, stop: asyncio.Event) -> None:
        """Keep the backlog snapshot fresh."""
        while not stop.is_set():
            try:
                async with self._lock:
                    await self.refresh_backlog()
            except Exception as exc:
                log.warning("backlog read failed: %r", exc)
            try:
                await asyncio.wait_for(stop.wait(), self._cfg.scheduler.backlog_interval)
            except TimeoutError:
                pass
