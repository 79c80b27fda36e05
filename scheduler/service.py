"""The scheduler's policy: group backlog into sites and grant leases, critical first, within
each site's (adapted) limits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter, defaultdict, deque
from collections.abc import Collection

from google.protobuf.timestamp_pb2 import Timestamp
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError

from scheduler.adaptive import Adaptive
from scheduler.backlog import Backlog, Consumers, Queue, last_stored, read_backlog
from scheduler.leases import LANE_PREFIX, LeaseState, LeaseTable
from scheduler.shaping import Limits, Rules
from sluice import names
from sluice.config import Config
from sluice.nats_layout import kv_put_ttl
from sluice.resolver import DnsError, DnsPermanent, MxHost, Resolver
from sluice.telemetry import observe_sites
from sluice.v1 import scheduler_pb2

__all__ = ["Scheduler"]

log = logging.getLogger(__name__)

_ALIVE_KEY = "scheduler-alive"
# Domains whose sites are looked up together (one batch), and domains being looked up at
# most, all callers together.
_RESOLVING = 64
_IN_FLIGHT = 256
# Seconds until a domain whose lookup failed is looked up again.
_RETRY_LOOKUP = 5.0
# A lane with at least this many messages stored gets a second deliverer when one has no
# lane with mail (Scheduler._share_lane).
_SHARE_LANE = 256
# Seconds after a shared lane lease ends before that lane is shared again.
_SHARE_COOLDOWN = 5.0
# A backlog read that named this many subjects or more is read again only when mail was
# stored since, or after _RECOUNT seconds (Scheduler.refresh_backlog).
_BIG_BACKLOG = 1000
_RECOUNT = 5.0


def _limits_proto(limits: Limits) -> scheduler_pb2.SiteLimits:
    return scheduler_pb2.SiteLimits(
        max_connections=limits.max_connections,
        max_message_rate=limits.max_message_rate,
        max_deliveries_per_connection=limits.max_deliveries_per_connection,
        max_connection_rate=limits.max_connection_rate,
    )


class Places:
    """A count of places (lookups in flight): `take` waits for one to be free and takes as
    many as are free, up to what it wants, so that no caller holds some while waiting for
    more (callers that each waited for a whole batch, one place at a time, could hold all
    of them between them and wait forever)."""

    def __init__(self, places: int) -> None:
        self.free = places
        self._waiting: deque[asyncio.Future[None]] = deque()

    async def take(self, want: int) -> int:
        while self.free <= 0:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting.append(waiter)
            try:
                await waiter
            finally:
                with contextlib.suppress(ValueError):
                    self._waiting.remove(waiter)
        got = min(want, self.free)
        self.free -= got
        self._wake()  # (the next waiter, if places are left)
        return got

    def give(self, places: int) -> None:
        self.free += places
        self._wake()

    def _wake(self) -> None:
        if self.free > 0:
            while self._waiting:
                waiter = self._waiting.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    break


class Scheduler:
    def __init__(self, cfg: Config, js: JetStreamContext, rules: Rules, resolver: Resolver) -> None:
        self._cfg = cfg
        self._js = js
        self._rules = rules
        self._resolver = resolver
        self.leases = LeaseTable(cfg.scheduler.lease_ttl)
        self.adaptive = Adaptive(cfg.scheduler, js)
        self._backlog = Backlog()
        # The sites of the backlog's hash-bucket mail (_bucketed_sites), and its domain keys
        # whose site was not known yet.
        self._bucketed: set[str] = set()
        self._bucketed_for: Backlog | None = None
        # _unresolved's last pass: the backlog it went through, when the first site it
        # found expires, and the domains it left unknown.
        self._unresolved_for: Backlog | None = None
        self._unresolved_until = 0.0
        self._unknown_left: set[str] = set()
        # Looking up the sites of a new backlog's domains, outside the lock (run_backlog).
        self._resolving: asyncio.Task[None] | None = None
        # Lookups in flight, all callers together: the backlog loop's thousands and the
        # deliverers' calls share the nameserver, which drops what it cannot answer (and a
        # domain whose lookup fails gets no lease for a while: _lookup_failed).
        self._dns = Places(_IN_FLIGHT)
        # The domains being looked up, each with a future set when its lookup ends (one
        # lookup per domain at a time: the backlog loop and a deliverer's call may ask for
        # the same new domain together).
        self._looking_up: dict[str, asyncio.Future[None]] = {}
        self.consumers = Consumers(js, cfg)
        self._backlog_at = 0.0  # (when it was last known current)
        self._read_at = 0.0  # (when its subjects were last read)
        # Sites by domain key (names.domain_key_of), until when (monotonic) they are good:
        # keyed as the backlog names domains, since a long tail's backlog is thousands of
        # keys a read, and turning each into its domain to look it up cost more than the
        # look-up.
        self._sites: dict[str, tuple[float, str]] = {}
        # Domains whose lookups fail: (first, last) failure; those of them whose site was
        # never found (their site is their name for now, held back from leases while the
        # failure is young: _lookup_failed, _holding).
        self._failing: dict[str, tuple[float, float]] = {}
        self._unknown: set[str] = set()
        self._cooldown: dict[str, float] = {}
        self._share_cooldown: dict[str, float] = {}  # by lane (_share_lane)
        # Deliverers by when they last asked for work (lane fair shares).
        self._seen: dict[str, float] = {}
        # How many more leases each deliverer could take when it last asked.
        self._room: dict[str, int] = {}
        self._last_decrease: dict[str, float] = {}
        self._grace_until = 0.0
        self.outcomes: Counter[tuple[str, int]] = Counter()
        self._lock = asyncio.Lock()
        # acquire_domains calls waiting for a connection of a (full) site, oldest first.
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}
        # Sites found full by a domain request, until when: their holders get no more then.
        self._wanted: dict[str, float] = {}

    async def start(self) -> None:
        """Restore adapted limits; if another scheduler was alive within one lease TTL, its
        leases may still be in use: grant nothing until they have run out."""
        await self.adaptive.load()
        kv = await self._js.key_value(names.SITES_BUCKET)
        try:
            await kv.get(_ALIVE_KEY)
            self._grace_until = time.monotonic() + self._cfg.scheduler.lease_ttl
            log.info(
                "a scheduler was alive recently: no new leases for %.0fs",
                self._cfg.scheduler.lease_ttl,
            )
        except KeyNotFoundError:
            pass
        await self._heartbeat()
        observe_sites(self._backlog_gauge, self._leases_gauge, self._connections_gauge)

    # Gauges, read when metrics are collected: from the last backlog read, the sites already
    # resolved (a domain not yet resolved counts as its own site) and the lease table.

    def _backlog_gauge(self) -> Counter[tuple[str, ...]]:
        out: Counter[tuple[str, ...]] = Counter()
        for (tier, key), n in self._backlog.domains.items():
            hit = self._sites.get(key)
            out[(names.tier_token(tier), hit[1] if hit else names.key_domain(key))] += n
        return out

    def _leases_gauge(self) -> Counter[tuple[str, ...]]:
        return Counter((ls.site_id,) for ls in self.leases.all())

    def _connections_gauge(self) -> Counter[tuple[str, ...]]:
        out: Counter[tuple[str, ...]] = Counter()
        for ls in self.leases.all():
            out[(ls.site_id,)] += ls.connections
        return out

    async def _heartbeat(self) -> None:
        await kv_put_ttl(
            self._js, names.SITES_BUCKET, _ALIVE_KEY, b"1", self._cfg.scheduler.lease_ttl
        )

    async def refresh_backlog(self) -> None:
        """Read the backlog; a big one only if mail was stored since the last read, or that
        read is _RECOUNT old. With no mail stored since, a backlog's counts can only have
        fallen (mail acked, terminated, purged) and no queue can have appeared: the read
        before still holds every queue with mail, some with less than it says. A long
        tail's backlog is thousands of subjects a read (400 KB for 8,500 domains): about
        25 ms for the scheduler and 10 ms for nats-server, every backlog_interval, while a
        blast drains."""
        now = time.monotonic()
        old = self._backlog
        if old.subjects >= _BIG_BACKLOG and now < self._read_at + _RECOUNT:
            if await last_stored(self._js) == old.last_seq:
                self._backlog_at = now
                return
        self._backlog = await read_backlog(self._js)
        self._backlog_at = self._read_at = time.monotonic()

    def _counts_until(self) -> float:
        """When the backlog's counts are read again at the latest (now, for a backlog that
        is read every time): a queue released with nothing ready is not handed out again
        before, as its count may be one its mail had before it drained."""
        if self._backlog.subjects >= _BIG_BACKLOG:
            return self._read_at + _RECOUNT
        return 0.0

    def _known_site(self, domain: str, now: float | None = None) -> str | None:
        """The domain's site from the cache, if known and not expired (at `now`, a
        monotonic time read once by a caller asking for thousands of domains)."""
        hit = self._sites.get(names.domain_key_of(domain))
        return hit[1] if hit and hit[0] > (time.monotonic() if now is None else now) else None

    def _last_site(self, domain: str) -> str | None:
        """The domain's site from the cache, expired or not (None if never looked up): what
        callers under the lock use, while the backlog loop looks expired ones up again."""
        hit = self._sites.get(names.domain_key_of(domain))
        return hit[1] if hit else None

    async def site_of(self, domain: str) -> str:
        while (known := self._known_site(domain)) is None:
            await self._learn_sites({domain})
        return known

    def _settle_site(self, domain: str, found: list[MxHost] | DnsError) -> None:
        """Cache the site of a domain looked up: that of its MX hosts, or of its failure."""
        if isinstance(found, DnsPermanent):
            # No such domain, or a null MX: the deliverer bounces its mail without connecting.
            log.info("site of %s: %s", domain, found)
            site, ttl = domain, 30.0
        elif isinstance(found, DnsError):
            site = self._lookup_failed(domain, time.monotonic())
            log.info("site of %s: lookup failed (%s); site %s", domain, found, site)
            return
        else:
            site, ttl = self._rules.site_of(domain, [h.host for h in found]), 300.0
        self._failing.pop(domain, None)
        self._unknown.discard(domain)
        # (the time after the lookup: a failing one takes the whole [dns] timeout)
        self._set_site(domain, time.monotonic() + ttl, site)

    def _lookup_failed(self, domain: str, now: float) -> str:
        """The site of a domain whose lookup failed (timeout, SERVFAIL). That must not make
        the domain a site of its own at once: with a limit of its own, its connections went
        to its provider's MX hosts on top of that site's limit (6-12 against 5 when
        bench.shaping's nameserver was overrun). A domain whose site was found before keeps
        it; one never found is held back (no lease) until its lookups have failed for
        `lookup_grace`, then it is its own site, and the deliverer meets the failure and
        defers its mail. Either is asked about again _RETRY_LOOKUP later while the failure
        is young, and every 30 s after."""
        grace = self._cfg.scheduler.lookup_grace
        first, last = self._failing.get(domain, (now, now))
        if now - last > grace + 30.0:  # (an old failure, not this one's beginning)
            first = now
        self._failing[domain] = (first, now)
        young = now - first < grace
        known = None if domain in self._unknown else self._last_site(domain)
        if known is not None:
            site = known
        else:
            site = domain
            self._unknown.add(domain)
        self._set_site(domain, now + (_RETRY_LOOKUP if young else 30.0), site)
        return site

    def _holding(self, site: str, domains: Collection[str], now: float) -> bool:
        """Whether `site`, with these domains, gets no lease yet: it is the placeholder site
        of a domain whose lookups have failed for less than lookup_grace (its real site is
        not known; a real site of the same name is no placeholder: it has other domains)."""
        if site not in self._unknown or site not in domains:
            return False
        first, _ = self._failing[site]
        return now - first < self._cfg.scheduler.lookup_grace

    def _forget_failures(self) -> None:
        """Drop the lookup failures of domains no longer in the backlog (and the placeholder
        sites of those never found: back in the backlog, such a domain is a new one)."""
        if not self._failing:
            return
        queued = {names.key_domain(key) for _, key in self._backlog.domains}
        for domain in [d for d in self._failing if d not in queued]:
            del self._failing[domain]
            if domain in self._unknown:
                self._unknown.discard(domain)
                self._sites.pop(names.domain_key_of(domain), None)

    async def _learn_sites(self, domains: Collection[str]) -> None:
        """Resolve the sites of those of `domains` not known yet, and wait for those another
        caller is looking up. The lookups go in batches of up to _RESOLVING sent together
        (Resolver.mx_many: a long tail of domains is thousands of lookups, and a coroutine
        and a timer each cost more than the lookup), side by side, each domain settled as
        its answer comes; at most _IN_FLIGHT domains are being looked up at a time, all
        callers together, and a slow one holds only its own place."""
        todo = deque(d for d in domains if self._known_site(d) is None)
        elsewhere: set[asyncio.Future[None]] = set()
        batches: list[asyncio.Future[None]] = []
        loop = asyncio.get_running_loop()
        try:
            while todo:
                places = await self._dns.take(_RESOLVING)
                ends: dict[str, asyncio.Future[None]] = {}
                while todo and len(ends) < places:
                    d = todo.popleft()
                    # (not one another caller settled or took up meanwhile: it is waited for)
                    if (other := self._looking_up.get(d)) is not None:
                        elsewhere.add(other)
                    elif self._known_site(d) is None and d not in ends:
                        ends[d] = self._looking_up[d] = loop.create_future()
                self._dns.give(places - len(ends))
                if ends:
                    batches.append(asyncio.ensure_future(self._look_up_sites(ends)))
            if batches:
                await asyncio.gather(*batches)
        finally:
            for batch in batches:
                batch.cancel()  # (when this caller was cancelled; its lookups end)
        if elsewhere:
            # (asyncio.wait: cancelling this caller must not cancel another's lookup)
            await asyncio.wait(elsewhere)

    async def _look_up_sites(self, ends: dict[str, asyncio.Future[None]]) -> None:
        """Look up the sites of a batch of domains, each with the future its waiters wait
        for and a place among those in flight, both given up as its answer comes."""
        try:
            async for came in self._resolver.mx_many(list(ends)):
                for domain, found in came:
                    self._settle_site(domain, found)
                    self._end_lookup(domain, ends.pop(domain))
        finally:
            for domain, end in ends.items():
                self._end_lookup(domain, end)

    def _end_lookup(self, domain: str, end: asyncio.Future[None]) -> None:
        if self._looking_up.get(domain) is end:
            del self._looking_up[domain]
        if not end.done():
            end.set_result(None)
        self._dns.give(1)

    def _by_site(self) -> dict[str, list[Queue]]:
        """Dedicated queues grouped by site; those of a domain not looked up yet wait for
        the backlog loop (nothing is looked up under the lock)."""
        by_site: dict[str, list[Queue]] = defaultdict(list)
        for q in self._backlog.queues:
            if not q.bucket and (site := self._last_site(q.domain)) is not None:
                by_site[site].append(q)
        return by_site

    def _by_lane(self) -> dict[str, list[Queue]]:
        by_lane: dict[str, list[Queue]] = defaultdict(list)
        for q in self._backlog.queues:
            if q.bucket:
                by_lane[q.lane].append(q)
        return by_lane

    def limits(self, site: str, domains: list[str]) -> Limits:
        return self.adaptive.current(site, self._rules.limits(site, domains))

    def _bucketed_sites(self) -> set[str]:
        """The known sites with mail in hash buckets. Nothing is looked up here, under the
        lock: a long tail's new domains are thousands of lookups, seconds in which every
        other call waited for the lock and deliverers' renewals ran out (a 100,000-recipient
        blast over 8,500 domains stalled deliveries for ten seconds and more); run_backlog
        looks them up. Each backlog read is gone through once; a site learned later is added
        as it is learned (_set_site). Every call for work went through all the domains again
        while any was unknown (thousands in a long tail; 15 % of the scheduler's CPU), and
        later through those still unknown (a 100,000-recipient tail: 9 % of its busy time)."""
        if self._bucketed_for is not self._backlog:
            self._bucketed_for = self._backlog
            sites = self._sites
            self._bucketed = {hit[1] for key in self._backlog.bucketed if (hit := sites.get(key))}
        return self._bucketed

    def _set_site(self, domain: str, until: float, site: str) -> None:
        """Record a domain's site (looked up just now, or standing in for a failed lookup)
        until `until`, and count it among the sites with bucket mail if the domain has some."""
        key = names.domain_key_of(domain)
        self._sites[key] = (until, site)
        self._unresolved_until = min(self._unresolved_until, until)
        if self._bucketed_for is self._backlog and key in self._backlog.bucketed:
            self._bucketed.add(site)

    def _unresolved(self) -> set[str]:
        """Domains with mail in the backlog whose site is not known (or has expired).

        A backlog read is gone through once, and again only once a site it names expires;
        meanwhile only the domains still unknown are checked. (Going through a long tail's
        8,500 domains at every tick of the backlog loop was 12 % of the scheduler's busy
        samples: py-spy, 2026-12-01.)"""
        now = time.monotonic()
        sites = self._sites
        if self._unresolved_for is self._backlog and now < self._unresolved_until:
            # (a site settled since counts in _unresolved_until already: _set_site)
            self._unknown_left = {
                domain
                for domain in self._unknown_left
                if (hit := sites.get(names.domain_key_of(domain))) is None or hit[0] <= now
            }
            return set(self._unknown_left)
        until = math.inf
        left = set()
        for _, key in self._backlog.domains:
            hit = sites.get(key)
            if hit is None or hit[0] <= now:
                left.add(names.key_domain(key))
            elif hit[0] < until:
                until = hit[0]
        self._unresolved_for, self._unresolved_until, self._unknown_left = (
            self._backlog,
            until,
            left,
        )
        return set(left)

    async def _resolve(self, domains: set[str]) -> None:
        try:
            await self._learn_sites(domains)
        except Exception as exc:  # (site_of turns DNS failures into a site)
            log.warning("looking up the sites of %d domains failed: %r", len(domains), exc)

    def _lane_share(self, deliverer_id: str, lanes: set[str]) -> tuple[int, int]:
        """(lanes this deliverer holds, its fair share of the lanes with mail): lanes are
        split evenly between the deliverers that asked for work lately, so a second
        deliverer is not left idle while the first holds every lane."""
        now = time.monotonic()
        # Only deliverers that asked for work lately count: a crashed one stops asking; a
        # live one asks every idle_poll (for lanes only when it is at its max_leases).
        window = max(2.0, 4 * self._cfg.deliverer.idle_poll)
        for d, t in list(self._seen.items()):
            if now - t > window:
                del self._seen[d]
                self._room.pop(d, None)
        held = sum(1 for ls in self.leases.held_by(deliverer_id) if ls.whole_lane)
        lanes |= {ls.lane for ls in self.leases.all() if ls.kind == "lane"}
        sharing = len(self._seen.keys() | {deliverer_id})
        return held, max(1, math.ceil(len(lanes) / sharing))

    def _rebalance_lanes(self, deliverer_id: str, lanes: set[str]) -> None:
        """Take back lanes this deliverer holds beyond its fair share while another
        deliverer holds fewer than its own (the newest first); they go to the next asker."""
        held, share = self._lane_share(deliverer_id, lanes)
        if held <= share:
            return
        counts = {d: 0 for d in self._seen}
        for ls in self.leases.all():
            if ls.whole_lane and ls.deliverer_id in counts:
                counts[ls.deliverer_id] += 1
        # As many as the others are short of (lanes do not take lease slots, and every
        # deliverer asks for its share of them each idle_poll, busy or not).
        wanted = sum(share - n for d, n in counts.items() if d != deliverer_id and n < share)
        if wanted <= 0:
            return
        mine = sorted(
            (ls for ls in self.leases.held_by(deliverer_id) if ls.whole_lane),
            key=lambda ls: ls.expires_at,
        )
        for ls in mine[share:][:wanted]:
            self.leases.release(deliverer_id, ls.lease_id)
            log.info("lease %s: lane=%s taken back for another deliverer", ls.lease_id, ls.lane)

    async def acquire(self, deliverer_id: str, max_leases: int) -> list[scheduler_pb2.Lease]:
        async with self._lock:
            now = time.monotonic()
            self._seen[deliverer_id] = now
            self._room[deliverer_id] = max_leases
            if now < self._grace_until:
                return []
            if now - self._backlog_at > self._cfg.scheduler.backlog_interval:
                await self.refresh_backlog()
            by_site = self._by_site()
            by_lane = self._by_lane()
            bucketed = self._bucketed_sites()
            # Sites and lanes whose best queue is the highest tier come first.
            work: list[tuple[int, str, str]] = [
                (min(q.tier for q in qs), "site", site) for site, qs in by_site.items()
            ]
            work += [(min(q.tier for q in qs), "lane", lane) for lane, qs in by_lane.items()]
            work.sort()
            granted: list[scheduler_pb2.Lease] = []
            sites_granted = 0
            lanes_held, lane_share = self._lane_share(deliverer_id, set(by_lane))
            mine = self._second_lease_withheld(deliverer_id)
            for _, kind, name in work:
                if self._cooldown.get(LANE_PREFIX + name if kind == "lane" else name, 0.0) > now:
                    continue
                if kind == "lane":
                    # Lanes are dealt apart from max_leases (a fair share each): counted
                    # against it, a lone deliverer's 16 slots went to the 16 lanes, which
                    # sort first, and a long tail's busiest domains (their own queues, a
                    # third of its mail) waited for the lanes to drain.
                    if lanes_held >= lane_share:
                        continue
                    lease = self._grant_lane(deliverer_id, name)
                    lanes_held += lease is not None
                    if lease is not None:
                        granted.append(await self._to_proto(lease, by_lane[name]))
                    continue
                site = name
                if sites_granted >= max_leases or site in mine or self.adaptive.suspended(site):
                    continue
                queues = by_site[site]
                domains = sorted({q.domain for q in queues})
                if self._holding(site, domains, now):
                    continue
                limits = self.limits(site, domains)
                # A lease takes at most half the site's connections (rounded up), so that a
                # second deliverer can share a busy site; a site that also has mail in hash
                # buckets keeps a connection for it.
                share = max(1, math.ceil(limits.max_connections / 2))
                reserve = 1 if site in bucketed and limits.max_connections > 1 else 0
                lease = self.leases.grant(
                    site, deliverer_id, limits, domains, share, reserve=reserve
                )
                if lease is None:
                    continue
                granted.append(await self._to_proto(lease, queues))
                sites_granted += 1
                log.info(
                    "lease %s: site=%s deliverer=%s connections=%d domains=%d",
                    lease.lease_id,
                    site,
                    deliverer_id,
                    lease.connections,
                    len(domains),
                )
            if not granted and max_leases > 0:
                shared = self._share_lane(deliverer_id, by_lane, now)
                if shared is not None:
                    granted.append(await self._to_proto(shared, by_lane[shared.lane]))
            self._room[deliverer_id] = max_leases - sites_granted
            return granted

    def _second_lease_withheld(self, deliverer_id: str) -> set[str]:
        """The sites this deliverer already has a lease on, when another deliverer with room
        asked for work lately: a site's second lease (a lease takes at most half of it) is
        left for that one. Otherwise the first to ask took both halves of every site, and
        with enough lease slots the other idled."""
        if not any(d != deliverer_id and n > 0 for d, n in self._room.items()):
            return set()
        return {ls.site_id for ls in self.leases.held_by(deliverer_id) if ls.kind == "site"}

    def _share_lane(
        self, deliverer_id: str, by_lane: dict[str, list[Queue]], now: float
    ) -> LeaseState | None:
        """A second holder for the lane with the most mail, when this deliverer has no lane
        with mail and every lane with mail is held: a blast's last lanes were otherwise
        worked by one deliverer while the other idled (lanes are whole: ten domains in five
        lanes are dealt three and two)."""
        mine = {ls.lane for ls in self.leases.held_by(deliverer_id) if ls.kind == "lane"}
        if mine & by_lane.keys():
            return None
        holders: Counter[str] = Counter(ls.lane for ls in self.leases.all() if ls.kind == "lane")
        best, most = "", _SHARE_LANE
        for lane, queues in by_lane.items():
            if (
                holders[lane] != 1
                or self._cooldown.get(LANE_PREFIX + lane, 0.0) > now
                or self._share_cooldown.get(lane, 0.0) > now
            ):
                continue
            n = sum(self._backlog.queues.get(q, 0) for q in queues)
            if n >= most:
                best, most = lane, n
        return self._grant_lane(deliverer_id, best, shared=True) if best else None

    def _grant_lane(self, deliverer_id: str, lane: str, shared: bool = False) -> LeaseState | None:
        """A hash-bucket lane goes to one deliverer at a time (a `shared` lease is its second
        holder: the lane's limit is doubled for it, so never a third); the sites of its
        domains are leased one connection at a time as its mail is delivered
        (acquire_domains)."""
        n = self._cfg.scheduler.bucket_connections
        limits = Limits(max_connections=2 * n if shared else n, max_deliveries_per_connection=0)
        lease = self.leases.grant(LANE_PREFIX + lane, deliverer_id, limits, [], n, kind="lane")
        if lease is not None:
            lease.shared = shared
            log.info(
                "lease %s: lane=%s deliverer=%s%s",
                lease.lease_id,
                lane,
                deliverer_id,
                " (shared)" if shared else "",
            )
        return lease

    async def acquire_domains(
        self, deliverer_id: str, domains: list[str], wait: float = 0.0, connections: int = 1
    ) -> scheduler_pb2.AcquireLeasesResponse:
        """A lease on each of the domains' sites, for mail taken from a hash-bucket lane:
        up to `connections` connections, at most half the site's limit (rounded up) and at
        least one; domains of one site share their lease. Full or suspended sites get none,
        or, with `wait`, the first connection released on them within that time (instead of
        the caller asking again and again). The response names every domain's site."""
        until = time.monotonic() + wait
        while True:
            resp = await self._acquire_domains(deliverer_id, domains, connections)
            left = until - time.monotonic()
            sites = set(resp.domain_sites.values())
            if resp.leases or left <= 0 or len(sites) != 1:
                return resp
            # One waiter is woken per connection released (not all of them: a busy site can
            # have many callers waiting).
            site = sites.pop()
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            queue = self._waiting.setdefault(site, deque())
            queue.append(waiter)
            try:
                await asyncio.wait_for(waiter, left)
            except TimeoutError:
                pass
            finally:
                with contextlib.suppress(ValueError):
                    queue.remove(waiter)
                if not queue and self._waiting.get(site) is queue:
                    del self._waiting[site]

    async def _acquire_domains(
        self, deliverer_id: str, domains: list[str], connections: int
    ) -> scheduler_pb2.AcquireLeasesResponse:
        # (looked up before taking the lock: every other call waits for it)
        await self._learn_sites(set(domains))
        async with self._lock:
            out = scheduler_pb2.AcquireLeasesResponse()
            by_site: dict[str, list[str]] = {}
            unknown: set[str] = set()  # (forgotten since the lookup: no lease this time)
            for domain in dict.fromkeys(domains):
                # (as looked up just now; nothing is looked up under the lock)
                site = self._last_site(domain)
                if site is None:
                    site = domain
                    unknown.add(domain)
                out.domain_sites[domain] = site
                by_site.setdefault(site, []).append(domain)
                if known := self._resolver.known_mx(domain):
                    hosts, ttl = known
                    mx = out.domain_mx[domain]
                    mx.ttl_seconds = int(ttl)
                    for h in hosts:
                        mx.hosts.add(preference=h.preference, host=h.host)
            now = time.monotonic()
            if now < self._grace_until:
                return out
            if len(self._wanted) > 1000:
                self._wanted = {s: t for s, t in self._wanted.items() if t > now}
            for site, site_domains in by_site.items():
                if (
                    site in unknown
                    or self.adaptive.suspended(site)
                    or self._holding(site, site_domains, now)
                ):
                    continue
                if self._wanted.get(site, 0.0) > now and any(
                    ls.site_id == site for ls in self.leases.held_by(deliverer_id)
                ):
                    continue  # (no more for a holder while others want the site)
                limits = self.limits(site, site_domains)
                share = min(connections, max(1, math.ceil(limits.max_connections / 2)))
                lease = self.leases.grant(
                    site, deliverer_id, limits, site_domains, share, kind="domain"
                )
                if lease is None:
                    # Found full: for a second its holders get no more of it (a caller
                    # woken by a release asks again within that time).
                    self._wanted[site] = now + 1.0
                if lease is not None:
                    out.leases.append(self.describe(lease))
            return out

    async def _queues(self, queues: list[Queue]) -> list[scheduler_pb2.LeaseQueue]:
        return [
            scheduler_pb2.LeaseQueue(
                tier=q.tier,
                key=q.key,
                lane=q.lane,
                tenant_id=q.tenant,
                consumer=await self.consumers.ensure(q),
            )
            for q in sorted(queues, key=lambda q: (q.tier, q.tenant, q.key))
        ]

    async def _to_proto(self, lease: LeaseState, queues: list[Queue]) -> scheduler_pb2.Lease:
        return self.describe(lease, await self._queues(queues))

    @staticmethod
    def describe(
        lease: LeaseState, queues: list[scheduler_pb2.LeaseQueue] | None = None
    ) -> scheduler_pb2.Lease:
        expires = Timestamp()
        expires.FromNanoseconds(int(lease.expires_at * 1e9))
        # The site's rates are split between its leases by their connections.
        share = lease.connections / max(1, lease.limits.max_connections)
        return scheduler_pb2.Lease(
            lease_id=lease.lease_id,
            site_id=lease.site_id,
            domains=lease.domains,
            queues=queues or [],
            max_connections=lease.connections,
            max_message_rate=lease.limits.max_message_rate * share,
            max_deliveries_per_connection=lease.limits.max_deliveries_per_connection,
            expires_at=expires,
            max_connection_rate=lease.limits.max_connection_rate * share,
            bulk_reserve=lease.limits.bulk_reserve,
            lane=lease.lane,
        )

    async def renew(
        self, deliverer_id: str, lease_ids: list[str]
    ) -> scheduler_pb2.RenewLeasesResponse:
        """Extend leases, with their current queues (a new critical queue shows up here);
        leases over a site's adapted limit, or of a suspended site, are taken back."""
        async with self._lock:
            by_site = self._by_site()
            by_lane = self._by_lane()
            self._shrink()
            self._rebalance_lanes(deliverer_id, set(by_lane))
            resp = scheduler_pb2.RenewLeasesResponse()
            for lease_id in lease_ids:
                ls = self.leases.renew(deliverer_id, lease_id)
                if ls is None:
                    resp.lost_lease_ids.append(lease_id)
                    continue
                queues = _lease_queues(ls, by_site, by_lane)
                resp.leases.append(self.describe(ls, await self._queues(queues)))
            return resp

    def _shrink(self) -> None:
        """Revoke the newest leases of sites now over their limit (or suspended)."""
        per_site: dict[str, list[LeaseState]] = defaultdict(list)
        for ls in self.leases.all():
            if ls.kind != "lane" and not ls.revoked:
                per_site[ls.site_id].append(ls)
        for site, leases in per_site.items():
            limit = self.limits(site, leases[0].domains).max_connections
            if self.adaptive.suspended(site):
                limit = 0
            leases.sort(key=lambda ls: ls.expires_at)
            while leases and sum(ls.connections for ls in leases) > limit:
                gone = leases.pop()
                self.leases.revoke(gone.lease_id)
                log.warning(
                    "lease %s on site %s revoked: site limit is now %d", gone.lease_id, site, limit
                )

    def release(self, deliverer_id: str, lease_ids: list[str]) -> None:
        for lease_id in lease_ids:
            ls = self.leases.get(lease_id)
            if ls is None or ls.deliverer_id != deliverer_id:
                continue
            if ls.shared:
                # Its mail may have been in the other holder's hands already (stored counts
                # it until it is acked): not shared again for a while.
                self._share_cooldown[ls.lane] = time.monotonic() + _SHARE_COOLDOWN
            if ls.kind != "domain" and not ls.revoked:
                # A released site or lane had nothing ready; do not hand it straight back.
                self._cooldown[ls.site_id] = max(
                    time.monotonic() + self._cfg.scheduler.backlog_interval, self._counts_until()
                )
            self.leases.release(deliverer_id, lease_id)
            self._wake(ls.site_id, ls.connections)

    def _wake(self, site: str, n: int) -> None:
        """Wake the `n` longest waiting acquire_domains calls for `site` (one per
        connection released)."""
        queue = self._waiting.get(site)
        while queue and n > 0:
            waiter = queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                n -= 1
        if queue is not None and not queue:
            del self._waiting[site]

    async def report(self, outcomes: list[scheduler_pb2.Outcome]) -> None:
        successes: Counter[str] = Counter()
        for o in outcomes:
            n = o.count or 1
            self.outcomes[(o.site_id, o.kind)] += n
            if o.kind == scheduler_pb2.OUTCOME_KIND_THROTTLED:
                now = time.monotonic()
                # One decrease per cooldown: a burst of 421s is one signal, not twenty.
                if now - self._last_decrease.get(o.site_id, 0.0) >= (
                    self._cfg.scheduler.throttle_cooldown
                ):
                    self._last_decrease[o.site_id] = now
                    await self.adaptive.throttled(
                        o.site_id, f"{o.reply.code} {o.reply.text}".strip()
                    )
            elif o.kind == scheduler_pb2.OUTCOME_KIND_DELIVERED:
                successes[o.site_id] += n
        for site, n in successes.items():
            await self.adaptive.succeeded(site, n)

    async def sites(self) -> scheduler_pb2.ListSitesResponse:
        await self._learn_sites(self._unresolved())  # (before taking the lock, as above)
        async with self._lock:
            # Backlog per site and tier, dedicated and hash-bucket lanes alike.
            tiers: dict[str, Counter[names.Tier]] = defaultdict(Counter)
            domains: dict[str, set[str]] = defaultdict(set)
            for (tier, key), n in self._backlog.domains.items():
                site = self._last_site(names.key_domain(key)) or names.key_domain(key)
                tiers[site][tier] += n
                domains[site].add(names.key_domain(key))
            known = set(tiers) | set(self.adaptive.states)
            known |= {ls.site_id for ls in self.leases.all() if ls.kind != "lane"}
            resp = scheduler_pb2.ListSitesResponse()
            for site in known:
                site_domains = sorted(domains.get(site, ()))
                configured = self._rules.limits(site, site_domains)
                leases = [ls for ls in self.leases.all() if ls.site_id == site]
                status = scheduler_pb2.SiteStatus(
                    site_id=site,
                    domains=site_domains,
                    configured=_limits_proto(configured),
                    current=_limits_proto(self.adaptive.current(site, configured)),
                    leases=len(leases),
                    connections_in_use=sum(ls.connections for ls in leases),
                    backlog=[
                        scheduler_pb2.TierBacklog(tier=t, messages=n)
                        for t, n in sorted(tiers.get(site, Counter()).items())
                    ],
                )
                st = self.adaptive.states.get(site)
                if st is not None:
                    status.reason = st.reason
                    if st.suspended_until > time.time():
                        status.suspended_until.FromNanoseconds(int(st.suspended_until * 1e9))
                resp.sites.append(status)
            resp.sites.sort(key=lambda s: -sum(b.messages for b in s.backlog))
            return resp

    async def run_backlog(self, stop: asyncio.Event) -> None:
        """Keep the backlog snapshot fresh and the liveness key alive; delete idle consumers;
        look up the sites of the backlog's new domains (beside the lock)."""
        try:
            await self._backlog_loop(stop)
        finally:
            # (also when cancelled: leadership ends, and the lookups with it)
            if self._resolving is not None:
                self._resolving.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._resolving

    async def _backlog_loop(self, stop: asyncio.Event) -> None:
        beats = collected = 0.0
        interval = self._cfg.scheduler.backlog_interval
        while not stop.is_set():
            try:
                async with self._lock:
                    # (unless an acquire read it meanwhile: with a long tail a read is
                    # thousands of subjects, for nats-server and for us)
                    if time.monotonic() - self._backlog_at >= interval / 2:
                        await self.refresh_backlog()
                if self._resolving is None or self._resolving.done():
                    # The sites of new domains, looked up beside (not under) the lock.
                    if unresolved := self._unresolved():
                        self._resolving = asyncio.create_task(self._resolve(unresolved))
                now = time.monotonic()
                if now - beats > self._cfg.scheduler.lease_ttl / 3:
                    beats = now
                    await self._heartbeat()
                if now - collected > self._cfg.scheduler.consumer_idle / 4:
                    collected = now
                    async with self._lock:
                        leased = await self._leased_consumers()
                        await self.consumers.collect(self._backlog, leased)
                    self._forget_failures()
                # The next read is due an interval after the last one, whoever made it.
                due = self._backlog_at + interval - time.monotonic()
            except Exception as exc:
                log.warning("backlog read failed: %r", exc)
                due = interval
            try:
                await asyncio.wait_for(stop.wait(), max(due, interval / 10))
            except TimeoutError:
                pass

    async def _leased_consumers(self) -> set[str]:
        """Consumers of queues a live lease covers (deliverers may be bound to them)."""
        by_site = self._by_site()
        by_lane = self._by_lane()
        return {q.consumer for ls in self.leases.all() for q in _lease_queues(ls, by_site, by_lane)}


def _lease_queues(
    ls: LeaseState, by_site: dict[str, list[Queue]], by_lane: dict[str, list[Queue]]
) -> list[Queue]:
    """The queues a lease covers now: its site's, its lane's, or none (a domain lease)."""
    if ls.kind == "site":
        return by_site.get(ls.site_id, [])
    if ls.kind == "lane":
        return by_lane.get(ls.lane, [])
    return []
