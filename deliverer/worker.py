"""The deliverer's policy: acquire leases, pull each site's queues critical-first, deliver,
and settle every pointer (ack, nak with a ladder delay, or dead-letter then term)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import socket
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError, NotFoundError, ServiceUnavailableError
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from deliverer.background import Background
from deliverer.classify import Bounced, Deferred, Delivered, Outcome, Reply, classify
from deliverer.dkim_sign import DkimError, key_for, sign
from deliverer.mime import MessageTemplate
from deliverer.schedclient import SchedulerClient
from deliverer.sent import Sent
from deliverer.smtp import ConnectionLost, SmtpConnection
from sluice import names, suppressions
from sluice.config import Config
from sluice.outcomes import (
    BatchPublisher,
    count_published,
    event_message,
    publish_dead_letter,
)
from sluice.pull import delivered_count, fetch, late_messages
from sluice.resolver import DnsPermanent, DnsTemporary, MxHost, Resolver
from sluice.retry import busy_delay, next_delay
from sluice.singleflight import SingleFlight
from sluice.store import PayloadNotFound, PayloadStore, StoreError
from sluice.telemetry import count_site_wait, extract, tracer, tracing
from sluice.tenants import TenantCache, TenantStore
from sluice.v1 import messages_pb2, scheduler_pb2

__all__ = ["Deliverer"]

# At most this many recipients in one SMTP transaction (RFC 5321 4.5.3.1.8: servers take 100).
_MAX_RCPTS = 50
# Hash-bucket mail waits in the process per site (SiteQueue). A site's connection loop
# whose queue stays empty this long (seconds) closes its connection; the site's lease goes
# back with its last loop.
_LINGER = 0.5
# Site leases of hash-bucket mail given back within this long (seconds) go in one call.
_RELEASE_WINDOW = 0.1
# Connections asked for on a site (the scheduler grants at most half of the site's limit).
_CONNECTIONS = 4
# A site's queue gets one connection loop per this many transactions queued (as many as its
# leases allow).
_PER_LOOP = 8
# Transactions queued per site, and pointers queued in all, beyond which mail goes back to
# JetStream for a moment, and lanes stop fetching, respectively.
_SITE_QUEUE = 256
_IN_HAND = 2048
# Connection loops of hash-bucket mail per process. At the cap a queue that needs one takes
# the slot of a loop idling on another site; a long tail of sites with their own MX otherwise
# ran thousands of connections at once, and the process's NATS calls timed out. With 64, that
# tail (8,531 sites) ran at half the rate it does with 192, and at 1.2 times the CPU per
# message: loops were taken from idle sites only to reconnect to them a moment later.
_SITE_LOOPS = 192

# A connection's record that it may carry a domain's mail lasts as long as the domain's MX
# hosts are cached, and this long (seconds) at most (a route's domain: this long).
_SERVES_FOR = 30.0

# Transactions whose settling (events, acks) may still be in flight per process.
_SETTLING = 256
# What a stream without a leader answers a publish (or leaves unanswered); a settling
# that meets it is tried again, at most this long (seconds) apart.
_UNSTORED = (TimeoutError, NoStreamResponseError, ServiceUnavailableError)
_UNSTORED_PAUSE = 2.0
# Delivery ids remembered as delivered, for this long (seconds; three ack_waits if longer)
# and this many at most.
_SENT_FOR = 600.0
_SENT_MOST = 100_000
# Seconds a look for a delivered event may take (_delivered_elsewhere); then it is sent.
_ELSEWHERE_WAIT = 2.0

Group = list[tuple[Msg, messages_pb2.DeliveryPointer | None]]


@dataclass(eq=False)
class InHand:
    """Mail the process holds un-acked: a batch a connection loop fetched (groups before
    `next` are sent or settled), a group queued for its site, or a transaction's group until
    it is settled. Kept alive at JetStream by Deliverer._keep_in_hand_alive."""

    groups: list[Group]
    alive: float  # when its pointers were last known alive (fetched, or in progress)
    next: int = 0
    since: float = 0.0  # when it was queued for its site


@dataclass(eq=False)
class SiteQueue:
    """Hash-bucket mail for one site waiting in the process for a connection, highest tier
    first, and the leases on the site its connection loops deliver it under."""

    site: str
    tiers: dict[int, deque[InHand]] = field(default_factory=dict)
    size: int = 0  # transactions queued
    leases: list[LeaseWork] = field(default_factory=list)
    loops: int = 0  # connection loops working it
    # Loops waiting for mail, longest first (each is woken with True by mail queued, or
    # with False when it has waited _LINGER).
    idle: deque[asyncio.Future[bool | None]] = field(default_factory=deque)
    room: asyncio.Event = field(default_factory=asyncio.Event)  # (set when not full)
    acquiring: asyncio.Future[None] | None = None  # a lease being asked for
    pops: int = 0
    asked_more: float = 0.0  # when more connections were last asked for

    def live(self) -> bool:
        """Whether one of the queue's leases is still good."""
        for work in self.leases:
            if not work.lost.is_set():
                return True
        return False

    def push(self, in_hand: InHand, tier: int) -> None:
        queue = self.tiers.get(tier)
        if queue is None:
            queue = self.tiers[tier] = deque()
        queue.append(in_hand)
        self.size += 1

    def pop(self, bulk_reserve: int = 0) -> InHand | None:
        """The next transaction, highest tier first; with a bulk reserve of k, k pops out of
        ten look at bulk first (as a site lease's batches do: see _next_batch)."""
        self.pops += 1
        tiers = self.tiers
        if not tiers:
            return None
        if len(tiers) == 1:  # (mostly: one blast's tier)
            tier = next(iter(tiers))
        else:
            order = sorted(tiers)
            if bulk_reserve and self.pops % 10 < bulk_reserve:
                order.sort(key=lambda t: t != messages_pb2.TIER_BULK)
            tier = order[0]
        queue = tiers[tier]
        in_hand = queue.popleft()
        if not queue:
            del tiers[tier]
        self.size -= 1
        return in_hand

    def oldest(self) -> InHand | None:
        return min((q[0] for q in self.tiers.values()), key=lambda h: h.since, default=None)

    def entries(self) -> list[InHand]:
        return [in_hand for queue in self.tiers.values() for in_hand in queue]


log = logging.getLogger(__name__)

_OUTCOME_KIND = {
    Delivered: scheduler_pb2.OUTCOME_KIND_DELIVERED,
    Deferred: scheduler_pb2.OUTCOME_KIND_DEFERRED,
    Bounced: scheduler_pb2.OUTCOME_KIND_BOUNCED,
}


_tracer = tracer("deliverer")


def _trace_outcomes(span: Span, host: str, outcomes: dict[str, Outcome]) -> None:
    """What a transaction came to, on its span; any recipient not delivered is an error."""
    kinds = sorted({type(o).__name__.lower() for o in outcomes.values()})
    if host:
        span.set_attribute("server.address", host)
    span.set_attribute("sluice.outcomes", kinds)
    codes = sorted({o.reply.code for o in outcomes.values() if o.reply})
    span.set_attribute("smtp.reply_codes", codes)
    if kinds != ["delivered"]:
        span.set_status(Status(StatusCode.ERROR, ", ".join(kinds)))


def _end_span(span: Span | None) -> None:
    if span is not None and span.is_recording():
        span.end()


def _resolve(waiter: asyncio.Future[bool | None], value: bool | None) -> None:
    if not waiter.done():
        waiter.set_result(value)


def _seq(msg: Msg) -> str:
    """A pointer's key in the memory of pointers given back: its stream sequence, the same
    each time it is delivered."""
    return str(msg.metadata.sequence.stream)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class Pacer:
    """Spaces events of all of a lease's connections `1/rate` apart (0: no limit)."""

    def __init__(self) -> None:
        self._next = 0.0

    async def wait(self, rate: float) -> None:
        if rate <= 0:
            return
        now = time.monotonic()
        slot = max(now, self._next)
        self._next = slot + 1.0 / rate
        if slot > now:
            await asyncio.sleep(slot - now)


@dataclass
class LeaseWork:
    lease: scheduler_pb2.Lease
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    messages: Pacer = field(default_factory=Pacer)
    connections: Pacer = field(default_factory=Pacer)
    batches: int = 0
    since: float = field(default_factory=time.monotonic)  # when it was granted
    # Whose turn it is, per tier: tenants take turns (round robin, a fetch each), and so do
    # the queues of one tenant.
    turns: dict[tuple[int, str], int] = field(default_factory=dict)
    # One pull at a time per lease: concurrent pulls would split a message's pointers
    # (one transaction for several recipients) and contend at the server for nothing.
    fetching: asyncio.Lock = field(default_factory=asyncio.Lock)
    # A lease on a site of hash-bucket mail: its connection loops (SiteQueue).
    loops: int = 0


class Deliverer:
    def __init__(
        self,
        cfg: Config,
        js: JetStreamContext,
        store: PayloadStore,
        resolver: Resolver,
        scheduler: SchedulerClient,
        events: BatchPublisher,
    ) -> None:
        self._cfg = cfg
        self._events = events
        self._js = js
        self._store = store
        self._resolver = resolver
        self._scheduler = scheduler
        self.deliverer_id = f"{socket.gethostname()}-{os.getpid()}-{id(self):x}"
        self._work: dict[str, LeaseWork] = {}
        # Set when a lease's work ends (or on stop): the lease loop asks for work again at
        # once instead of after idle_poll (a deliverer whose lanes ran dry idled while the
        # other finished a blast's last lanes alone).
        self._freed = asyncio.Event()
        # One-connection leases on the sites of mail taken from hash-bucket lanes.
        self._domain_leases: dict[str, LeaseWork] = {}
        self._site_of: dict[str, str] = {}  # domain -> site, as the scheduler named it
        # Domain leases to give back, gathered for a moment (see _release_domain_lease).
        self._releasing: list[str] = []
        self._release_in_flight = False
        # Hash-bucket mail waiting for a connection, by site, with the site's leases and
        # connection loops; how many pointers are queued in all (lanes stop fetching at
        # _IN_HAND, and _room is set when there is room again).
        self._site_queues: dict[str, SiteQueue] = {}
        self._site_tasks: set[asyncio.Future[None]] = set()
        self._queued = 0
        self._room = asyncio.Event()
        self._asking: set[str] = set()  # known sites a batch call is asking for
        # The next batch lease call's domains, known sites and future (_name), whether a
        # call is in flight, and the call naming each domain asked for.
        self._next_domains: dict[str, None] = {}
        self._next_sites: set[str] = set()
        self._next_call: asyncio.Future[None] | None = None
        self._calling = False
        self._naming: dict[str, asyncio.Future[None]] = {}
        self._site_loops = 0  # connection loops of site queues running
        # Their idle loops, longest idle first (resolved with None: give up your slot), and
        # the queues waiting for a slot.
        self._idle: dict[asyncio.Future[bool | None], None] = {}
        self._starved: dict[str, None] = {}
        # The batches the connection loops are working through, and the transactions not
        # yet settled.
        self._batches: set[InHand] = set()
        self._in_flight: set[InHand] = set()
        self._stopping = False
        self._settling = Background(_SETTLING, "settling")
        # What this process delivered lately (its first attempt's number, the outcome, the
        # MX host): a pointer that comes back after its ack was lost is settled again
        # instead of being sent again.
        remember = max(_SENT_FOR, 3 * float(cfg.deliverer.ack_wait))
        self._sent: Sent[tuple[int, Outcome, str]] = Sent(remember, _SENT_MOST)
        # Pointers (stream sequences) this process gave back lately, undelivered (handed
        # back, deferred), with their delivery count then: one that comes back on the very
        # next delivery was with nobody meanwhile. Any other that comes back (not given back
        # by this process, or delivered to someone else in between) may have been delivered
        # by another deliverer whose ack was lost: its recipient's delivered event is looked
        # for first (_delivered_elsewhere).
        self._given_back: Sent[int] = Sent(remember, _SENT_MOST)
        # Outcomes since the last report: counted per (lease, site, kind), throttled ones
        # one by one with their reply (the scheduler logs why it cut a site's limits).
        self._tallies: dict[tuple[str, str, scheduler_pb2.OutcomeKind.ValueType], int] = {}
        self._throttles: list[scheduler_pb2.Outcome] = []
        self._subs: dict[str, JetStreamContext.PullSubscription] = {}
        # One pull at a time per subscription, whichever lease makes it: two leases of this
        # process on one site share its queues' subscriptions (the scheduler grants a lease
        # at most half of a site), and a fetch takes whatever waits in the subscription,
        # another fetch's messages too; the fetch robbed came back empty, and its
        # connection loop ended as if the queue were drained (a 10-domain blast's biggest
        # site ran on 4 connections of 5 for its last 15 s).
        self._pulling: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._parsed: dict[str, Sequence[messages_pb2.Payload]] = {}
        self._reads: SingleFlight[str, Sequence[messages_pb2.Payload]] = SingleFlight()
        self._templates: dict[tuple[str, str], MessageTemplate] = {}
        # The shortest ack_wait of the consumers worked (see _sub).
        self._ack_wait = float(cfg.deliverer.ack_wait)
        self._tenants = TenantCache(TenantStore(js), 30.0)
        self._require_tls = frozenset(d.lower() for d in cfg.deliverer.require_tls_domains)
        patterns = cfg.deliverer.throttle_patterns
        self._throttle = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None

    # -- the lease loop ------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        renewer = asyncio.create_task(self._renew_loop(stop))
        keeper = asyncio.create_task(self._keep_in_hand_alive(stop))
        waker = asyncio.create_task(self._wake_on(stop))
        tasks: set[asyncio.Task[None]] = set()
        try:
            while not stop.is_set():
                self._freed.clear()
                # Hash-bucket lanes take no lease slots: at max_leases this still asks, for
                # its share of the lanes (the scheduler deals them out between the askers).
                sites = sum(1 for w in self._work.values() if not w.lease.lane)
                free = max(0, self._cfg.deliverer.max_leases - sites)
                leases: list[scheduler_pb2.Lease] = []
                try:
                    resp = await self._scheduler.AcquireLeases(
                        scheduler_pb2.AcquireLeasesRequest(
                            deliverer_id=self.deliverer_id,
                            max_leases=max(1, free),
                            lanes_only=free == 0,
                        ),
                        timeout=5.0,
                    )
                    leases = list(resp.leases)
                except grpc.aio.AioRpcError as exc:
                    log.warning("scheduler unavailable: %s", exc.code().name)
                for lease in leases:
                    work = LeaseWork(lease)
                    self._work[lease.lease_id] = work
                    task = asyncio.create_task(self._work_lease(work, stop))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if not leases:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._cfg.deliverer.idle_poll):
                            await self._freed.wait()
            # Drain: each lease worker finishes the transaction in hand and hands back the rest.
            self._stopping = True
            drained_by = time.monotonic() + self._cfg.shutdown.drain_timeout
            if tasks:
                bound = min(self._cfg.deliverer.command_timeout, self._cfg.shutdown.drain_timeout)
                await asyncio.wait(tasks, timeout=bound)
            if self._site_tasks:
                bound = min(self._cfg.deliverer.command_timeout, self._cfg.shutdown.drain_timeout)
                await asyncio.wait(self._site_tasks, timeout=bound)
            for sq in list(self._site_queues.values()):
                if sq.acquiring is not None:
                    sq.acquiring.cancel()
                groups: list[Group] = []
                while (in_hand := self._dequeue(sq)) is not None:
                    groups.append(in_hand.groups[0])
                await self._hand_back(groups)
            # (a transaction's reply is awaited in its settling: bounded by the drain too; a
            # pointer left unsettled comes back after ack_wait)
            await self.settle_all(max(0.0, drained_by - time.monotonic()))
        finally:
            renewer.cancel()
            keeper.cancel()
            waker.cancel()
            await self._flush_outcomes()

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._freed.set()

    async def _renew_loop(self, stop: asyncio.Event) -> None:
        # Renewals also bring a site's current queues (a new critical queue starts here).
        interval = max(
            0.1, min(self._cfg.scheduler.lease_ttl / 3, self._cfg.deliverer.renew_interval)
        )
        while not stop.is_set():
            await asyncio.sleep(interval)
            await self._flush_outcomes()
            # Domain leases mostly end within a second: only those that have lasted an
            # interval are renewed (lane and site leases always: renewals bring their queues).
            young = time.monotonic() - interval
            # A lease known lost is not renewed again (its loop only finishes the batch in
            # hand, under the site leases that limit its connections).
            ids = [lease_id for lease_id, work in self._work.items() if not work.lost.is_set()]
            ids += [
                lease_id
                for lease_id, work in self._domain_leases.items()
                if work.since <= young and not work.lost.is_set()
            ]
            if not ids:
                continue
            try:
                resp = await self._scheduler.RenewLeases(
                    scheduler_pb2.RenewLeasesRequest(deliverer_id=self.deliverer_id, lease_ids=ids),
                    timeout=min(5.0, interval * 3),
                )
            except grpc.aio.AioRpcError as exc:
                log.warning("lease renewal failed: %s", exc.code().name)
                resp = scheduler_pb2.RenewLeasesResponse()
            for renewed in resp.leases:
                work = self._work.get(renewed.lease_id) or self._domain_leases.get(renewed.lease_id)
                if work is not None:
                    work.lease.expires_at.CopyFrom(renewed.expires_at)
                    if renewed.queues:
                        del work.lease.queues[:]
                        work.lease.queues.extend(renewed.queues)
            # A lease that could not be renewed ends at its expiry, scheduler or not: the
            # scheduler may already have given its connections to someone else.
            now = time.time()
            for work in [*self._work.values(), *self._domain_leases.values()]:
                if not work.lost.is_set() and work.lease.expires_at.ToNanoseconds() / 1e9 <= now:
                    log.warning(
                        "lease %s expired unrenewed; stopping work on it", work.lease.lease_id
                    )
                    work.lost.set()
            for lost in resp.lost_lease_ids:
                work = self._work.get(lost) or self._domain_leases.get(lost)
                if work is not None and not work.lost.is_set():
                    if work.lease.lane:  # (lanes are taken back to share them: routine)
                        log.info(
                            "lane lease %s (%s) taken back; its fetching stops, the mail in"
                            " hand is still delivered",
                            lost,
                            work.lease.lane,
                        )
                    else:
                        log.warning("lease %s lost; stopping work on it", lost)
                    work.lost.set()

    async def _flush_outcomes(self) -> None:
        if not self._tallies and not self._throttles:
            return
        batch, self._throttles = self._throttles, []
        counts = self._scheduler.outcome_counts
        for (lease_id, site_id, kind), n in self._tallies.items():
            if counts:
                batch.append(
                    scheduler_pb2.Outcome(lease_id=lease_id, site_id=site_id, kind=kind, count=n)
                )
            else:  # (an older scheduler, during a rolling upgrade: an Outcome per attempt)
                one = scheduler_pb2.Outcome(lease_id=lease_id, site_id=site_id, kind=kind)
                batch.extend(one for _ in range(n))
        self._tallies = {}
        try:
            await self._scheduler.ReportOutcomes(
                scheduler_pb2.ReportOutcomesRequest(deliverer_id=self.deliverer_id, outcomes=batch),
                timeout=5.0,
            )
        except grpc.aio.AioRpcError as exc:
            dropped = sum(o.count or 1 for o in batch)
            log.warning("outcome report failed (%d dropped): %s", dropped, exc.code().name)

    async def _work_lease(self, work: LeaseWork, stop: asyncio.Event) -> None:
        lease = work.lease
        try:
            if lease.lane:
                # A hash-bucket lane: one loop fetches its mail and queues it per site.
                await self._lane_loop(work, stop)
            else:
                n = max(1, min(lease.max_connections, self._cfg.deliverer.connections_per_lease))
                await asyncio.gather(*(self._connection_loop(work, stop) for _ in range(n)))
        except Exception:
            log.exception("lease %s failed", lease.lease_id)
        finally:
            self._work.pop(lease.lease_id, None)
            try:
                await self._hand_back_late(lease)
                await self._release(lease.lease_id)
            finally:
                self._freed.set()

    async def _hand_back_late(self, lease: scheduler_pb2.Lease) -> None:
        """Give back, at once, the pointers that came for this lease's queues after a fetch
        had timed out: nats-py keeps them for the next fetch of the subscription, and if the
        queue goes to another deliverer there is none, so they waited out ack_wait (a minute)
        un-acked. (bench.compare with DKIM on: a busy event loop made fetches time out, and
        the blast's last messages arrived a minute late.)"""
        busy = {q.consumer for w in self._work.values() for q in w.lease.queues}
        for q in lease.queues:
            sub = self._subs.get(q.consumer)
            if sub is None or q.consumer in busy:
                continue  # (another lease of this process still fetches from it)
            late = late_messages(sub)
            if late:
                log.info(
                    "%d pointers of %s came after their fetch; handed back", len(late), q.consumer
                )
            for msg in late:
                await self._nak(msg)

    async def _sub(self, consumer: str) -> JetStreamContext.PullSubscription:
        sub = self._subs.get(consumer)
        if sub is None:
            sub = await self._js.pull_subscribe_bind(consumer, names.MAIL_STREAM)
            self._subs[consumer] = sub
            # The scheduler creates the consumers: keep-alives follow the ack_wait they really
            # have, should its configuration differ from this process's.
            with contextlib.suppress(Exception):
                info = await sub.consumer_info()
                if info.config.ack_wait:
                    self._ack_wait = min(self._ack_wait, float(info.config.ack_wait))
        return sub

    async def _next_batch(self, work: LeaseWork) -> list[Msg]:
        """Messages from the highest tier with ready mail; [] when the lease is drained.

        Strict tiers, except that with a bulk reserve of k, k batches out of ten look at the
        bulk queues first, so bulk trickles out even under a steady stream of critical mail.
        Within a tier, tenants take turns a fetch at a time (deficit round robin with a
        quantum of `fetch_batch` messages), so one tenant's blast cannot crowd out another
        tenant's mail to the same site.
        """
        lease = work.lease
        work.batches += 1
        tiers = sorted({q.tier for q in lease.queues})
        if lease.bulk_reserve and work.batches % 10 < lease.bulk_reserve:
            tiers.sort(key=lambda t: t != messages_pb2.TIER_BULK)
        for tier in tiers:
            by_tenant: dict[str, list[scheduler_pb2.LeaseQueue]] = {}
            for q in lease.queues:
                if q.tier == tier:
                    by_tenant.setdefault(q.tenant_id, []).append(q)
            tenants = sorted(by_tenant)
            first = work.turns.get((tier, ""), 0)
            for i in range(len(tenants)):
                tenant = tenants[(first + i) % len(tenants)]
                msgs = await self._fetch_turn(work, tier, tenant, by_tenant[tenant])
                if msgs:
                    work.turns[(tier, "")] = first + i + 1  # the next tenant goes next
                    return msgs
        return []

    async def _fetch_turn(
        self,
        work: LeaseWork,
        tier: int,
        tenant: str,
        queues: list[scheduler_pb2.LeaseQueue],
    ) -> list[Msg]:
        """One fetch from the first of a tenant's queues (in turn) with ready mail."""
        first = work.turns.get((tier, tenant), 0)
        for i in range(len(queues)):
            q = queues[(first + i) % len(queues)]
            try:
                sub = await self._sub(q.consumer)
                async with self._pulling[q.consumer]:
                    msgs = await fetch(sub, self._cfg.deliverer.fetch_batch, 0.1)
            except NatsError as exc:
                # e.g. the scheduler deleted an idle consumer: bind again next time.
                log.info("queue %s unavailable: %r", q.consumer, exc)
                self._subs.pop(q.consumer, None)
                continue
            if msgs:
                work.turns[(tier, tenant)] = first + i + 1
                return msgs
        return []

    async def _connection_loop(self, work: LeaseWork, stop: asyncio.Event) -> None:
        """One connection of a site lease: fetch, deliver, repeat until drained or stopped."""
        conn: SmtpConnection | None = None
        try:
            while not stop.is_set() and not work.lost.is_set():
                async with work.fetching:
                    msgs = await self._next_batch(work)
                if not msgs:
                    return
                groups = self._groups(msgs)
                batch = InHand(groups, time.monotonic())
                self._batches.add(batch)
                try:
                    for i, group in enumerate(groups):
                        if stop.is_set() or work.lost.is_set():
                            # (not kept alive any more: a progress ack after the nak would
                            # hold the pointer until ack_wait)
                            batch.next = len(groups)
                            await self._hand_back(groups[i:])
                            return
                        batch.next = i  # (the rest is kept alive: _keep_in_hand_alive)
                        conn = await self._paced(group, work, conn)
                finally:
                    self._batches.discard(batch)
        finally:
            if conn is not None:
                await conn.close()

    # -- hash-bucket lanes: mail for many sites ----------------------------------------------

    async def _lane_loop(self, work: LeaseWork, stop: asyncio.Event) -> None:
        """A hash-bucket lane's mail is for many sites: fetch it and queue each transaction
        for its site in this process (SiteQueue); the site's own connection loops deliver it
        under a lease on the site (_site_loop). A lost lane only ends the fetching: the mail
        in hand is delivered under its site leases, which are what limit its connections
        (a lane is taken back to share the lanes between deliverers; handing its mail back
        then made about a tenth of a long-tail blast's mail come twice)."""
        while not stop.is_set() and not work.lost.is_set():
            while self._queued >= _IN_HAND and not stop.is_set():
                self._room.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):  # (no task, unlike wait_for)
                        await self._room.wait()
            if stop.is_set():
                return
            async with work.fetching:
                msgs = await self._next_batch(work)
            if not msgs:
                return
            groups = self._groups(msgs)
            batch = InHand(groups, time.monotonic())
            # Waits for room in full site queues share one deadline per batch: a slow site
            # with many of the batch's transactions holds the lane up once, not once each.
            deadline = batch.alive + min(self._cfg.deliverer.site_wait, self._ack_wait / 3)
            self._batches.add(batch)
            try:
                await self._lease_sites(groups)
                for i, group in enumerate(groups):
                    batch.next = i
                    p = group[0][1]
                    if p is None:  # undecodable: terminated (no connection needed)
                        await self._deliver(group, work, None)
                    elif (site := self._site_of.get(p.domain)) is None:
                        await self._hand_back_busy([group])  # (the scheduler is unreachable)
                    elif not self._enqueue(site, group, batch.alive):
                        await self._enqueue_when_room(site, group, batch.alive, deadline)
                batch.next = len(groups)
            finally:
                self._batches.discard(batch)

    def _enqueue(self, site: str, group: Group, alive: float) -> bool:
        """Queue `group` for `site`'s connection loops, unless the site's queue is full
        (False: see _enqueue_when_room). Mail of a higher tier than the queue's lowest goes
        in regardless (it is delivered first): critical mail never waits behind bulk. (Not
        a coroutine: a lane queues every transaction it fetches.)"""
        sq = self._site_queues.get(site)
        if sq is None:
            sq = self._site_queues[site] = SiteQueue(site)
        p = group[0][1]
        tier = p.tier if p is not None else 0
        if sq.size >= _SITE_QUEUE and tier >= max(sq.tiers):
            return False
        self._push(sq, group, alive, tier)
        return True

    def _push(self, sq: SiteQueue, group: Group, alive: float, tier: int) -> None:
        if not sq.live():
            count_site_wait(len(group), queued=True)  # (it waits for a lease on the site)
        sq.push(InHand([group], alive, since=time.monotonic()), tier)
        self._queued += len(group)
        self._staff(sq)

    async def _enqueue_when_room(self, site: str, group: Group, alive: float, until: float) -> None:
        """Queue `group` for `site`, whose queue is full: the lane waits (its mail is in the
        same proportions all along: fetching ahead only to hand back what the site cannot
        take yet cost more than it gained), up to `until`, then gives the group back for a
        moment."""
        sq = self._site_queues[site]
        p = group[0][1]
        tier = p.tier if p is not None else 0
        # (until it is a quarter empty: one wait per group kept the lane waking up for
        # every transaction the site finished)
        while sq.size >= _SITE_QUEUE and (left := until - time.monotonic()) > 0:
            sq.room.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await sq.room.wait()
        if sq.size >= _SITE_QUEUE:
            await self._hand_back_busy([group])
            self._staff(sq)
            return
        sq = self._site_queues.setdefault(site, sq)  # (in case it was dropped meanwhile)
        self._push(sq, group, alive, tier)

    def _dequeue(self, sq: SiteQueue, bulk_reserve: int = 0) -> InHand | None:
        in_hand = sq.pop(bulk_reserve)
        if in_hand is not None:
            self._queued -= len(in_hand.groups[0])
            if self._queued < _IN_HAND:
                self._room.set()
            if sq.size <= _SITE_QUEUE * 3 // 4:
                sq.room.set()
        return in_hand

    def _staff(self, sq: SiteQueue) -> None:
        """Start connection loops for `sq`'s mail: about one per _PER_LOOP transactions
        queued, as many as its leases have connections; without a live lease, ask for one."""
        live: list[LeaseWork] = []
        done = False  # (a lost lease without loops: it goes)
        for work in sq.leases:
            if not work.lost.is_set():
                live.append(work)
            elif not work.loops:
                done = True
        if done:
            for work in [w for w in sq.leases if w.lost.is_set() and not w.loops]:
                sq.leases.remove(work)
                self._spawn(self._release_domain_lease(work))
        if not live:
            if (
                sq.size
                and sq.acquiring is None
                and not self._stopping
                and sq.site not in self._asking
            ):
                sq.acquiring = asyncio.ensure_future(self._acquire_site(sq))
            return
        want = max(1, -(-sq.size // _PER_LOOP))
        capped = False  # (the process runs _SITE_LOOPS: more of the site would not help)
        for work in live:
            while sq.loops < want and work.loops < work.lease.max_connections:
                if self._site_loops >= _SITE_LOOPS:
                    self._starve(sq)
                    capped = True
                    break
                self._site_loops += 1
                work.loops += 1
                sq.loops += 1
                task = asyncio.ensure_future(self._site_loop(sq, work))
                self._site_tasks.add(task)
                task.add_done_callback(self._site_tasks.discard)
        for work in [w for w in live if not w.loops and not capped]:
            sq.leases.remove(work)  # (not needed: its connections go back)
            self._spawn(self._release_domain_lease(work))
        if (
            sq.loops < want
            and not capped
            and sq.acquiring is None
            and not self._stopping
            and time.monotonic() - sq.asked_more > 1.0
        ):
            # The queue outgrows the lease: ask for more of the site (at once, not waiting:
            # a full site is shared with others; asked at most once a second).
            sq.asked_more = time.monotonic()
            sq.acquiring = asyncio.ensure_future(self._acquire_more(sq))
        while sq.idle and sq.size:
            waiter = sq.idle.popleft()
            if not waiter.done():
                waiter.set_result(True)
                break

    def _starve(self, sq: SiteQueue) -> None:
        """`sq` needs a connection loop and the process runs _SITE_LOOPS: ask the longest
        idle loop to give up its slot (the queue gets it, _next_starved), if any."""
        self._starved[sq.site] = None
        while self._idle:
            waiter = next(iter(self._idle))
            del self._idle[waiter]
            if not waiter.done():
                waiter.set_result(None)
                return

    def _next_starved(self) -> None:
        """A slot freed: the queues waiting for one, in turn."""
        while self._starved and self._site_loops < _SITE_LOOPS:
            site = next(iter(self._starved))
            del self._starved[site]
            sq = self._site_queues.get(site)
            if sq is not None and sq.size and not self._stopping:
                self._staff(sq)

    async def _acquire_site(self, sq: SiteQueue) -> None:
        """Lease the site of `sq` (it has mail and no live lease): the scheduler holds the
        call until one of the site's connections is released; mail that waited
        `[deliverer] site_wait` (at most a third of ack_wait) without one goes back to
        JetStream for a moment (retry steps come from age: nothing is used up)."""
        site_wait = min(self._cfg.deliverer.site_wait, self._ack_wait / 3)
        try:
            while sq.size and not self._stopping:
                if sq.live():
                    return
                oldest = sq.oldest()
                assert oldest is not None
                left = oldest.since + site_wait - time.monotonic()
                if left <= 0.05:
                    self._give_up(sq, time.monotonic() - site_wait + 0.05)
                    continue
                domain = oldest.groups[0][0][1].domain  # type: ignore[union-attr]
                asked = time.monotonic()
                work = await self._acquire_domain_lease(domain, min(left, 1.0), _CONNECTIONS)
                if work is not None:
                    self._attach(work)
                elif time.monotonic() - asked < 0.1:
                    # Answered at once (no scheduler, or one granting nothing yet): not again
                    # at once.
                    await asyncio.sleep(min(left, 0.25))
        finally:
            sq.acquiring = None
            if sq.size and not self._stopping:
                self._staff(sq)
            self._forget(sq)

    async def _acquire_more(self, sq: SiteQueue) -> None:
        try:
            oldest = sq.oldest()
            if oldest is not None and oldest.groups[0][0][1] is not None:
                domain = oldest.groups[0][0][1].domain
                work = await self._acquire_domain_lease(domain, 0.0, _CONNECTIONS)
                if work is not None:
                    self._attach(work, more=True)
        finally:
            sq.acquiring = None
            # (a loop that ended meanwhile left the queue to this call: without a lease now,
            # the queue needs one)
            if sq.size and not self._stopping:
                self._staff(sq)
            self._forget(sq)

    def _give_up(self, sq: SiteQueue, before: float) -> None:
        """Give back the mail queued for `sq` since before `before` (its site stayed full)."""
        groups: list[Group] = []
        while (oldest := sq.oldest()) is not None and oldest.since <= before:
            in_hand = self._dequeue(sq)
            assert in_hand is not None
            groups.append(in_hand.groups[0])
        if groups:
            self._spawn(self._hand_back_busy(groups))

    def _attach(self, work: LeaseWork, more: bool = False) -> None:
        """A site lease granted: its site's queue delivers under it (or it goes back);
        `more`: asked for beside the queue's live lease."""
        sq = self._site_queues.get(work.lease.site_id)
        if sq is None or not sq.size or (not more and sq.live()):
            self._spawn(self._release_domain_lease(work))
            return
        sq.leases.append(work)
        self._staff(sq)

    async def _site_loop(self, sq: SiteQueue, work: LeaseWork) -> None:
        """One connection of `work` (a lease on `sq`'s site): deliver the queued mail,
        highest tier first, until the queue has stayed empty for _LINGER, the lease is lost
        or the process stops."""
        conn: SmtpConnection | None = None
        try:
            while not work.lost.is_set() and not self._stopping:
                in_hand = self._dequeue(sq, work.lease.bulk_reserve)
                if in_hand is None:
                    # (a future and a timer: cheaper than wait_for, which makes a task)
                    loop = asyncio.get_running_loop()
                    waiter: asyncio.Future[bool | None] = loop.create_future()
                    timer = loop.call_later(_LINGER, _resolve, waiter, False)
                    sq.idle.append(waiter)
                    self._idle[waiter] = None
                    try:
                        more = await waiter
                    finally:
                        timer.cancel()
                        self._idle.pop(waiter, None)
                        # (a waiter woken with True was taken off sq.idle: _staff)
                        if waiter.cancelled() or waiter.result() is not True:
                            with contextlib.suppress(ValueError):
                                sq.idle.remove(waiter)
                    if more is None or (not more and not sq.size):
                        return  # (None: its slot goes to another site's queue)
                    continue
                group = in_hand.groups[0]
                try:
                    if time.monotonic() - in_hand.alive > self._ack_wait / 3:
                        for msg, _ in group:  # still ours: tell JetStream before sending
                            await msg.in_progress()
                    if conn is not None and group[0][1] is not None:
                        conn = await self._fit(conn, group[0][1].domain)
                    conn = await self._paced(group, work, conn)
                except Exception:
                    # (e.g. NATS unreachable: the mail comes back, and this loop ends)
                    log.exception("site %s: delivery failed; handing back", sq.site)
                    with contextlib.suppress(Exception):
                        await self._hand_back_busy([group])
                    return
        finally:
            if conn is not None:
                await conn.close()
            self._site_loops -= 1
            work.loops -= 1
            sq.loops -= 1
            if not work.loops:
                sq.leases.remove(work)
                await self._release_domain_lease(work)
            if sq.size and not self._stopping:
                self._staff(sq)  # (the lease was lost: another one, or more loops)
            self._next_starved()
            self._forget(sq)

    def _forget(self, sq: SiteQueue) -> None:
        """Drop `sq` once nothing is queued, leased or asked for on it."""
        if not sq.size and not sq.leases and sq.acquiring is None:
            if self._site_queues.get(sq.site) is sq:
                del self._site_queues[sq.site]

    async def _lease_sites(self, groups: list[Group]) -> None:
        """Lease the sites of a fetched batch that this process holds no lease on (nor is
        asking for), and learn the sites of its new domains; a site that gets none is full
        (or suspended) and its queue waits for one (_acquire_site).

        The lanes' batches share the calls: a batch fetched while a call is in flight waits
        for it if it names the batch's domains, and its other domains go together in the
        next call, made when this one is answered (_name). (In a long tail every batch has
        new domains, and each made a call of its own: more calls than sites.)"""
        domains: dict[str, None] = {}
        sites: set[str] = set()  # (known sites asked for)
        calls: set[asyncio.Future[None]] = set()  # (answered when the call naming a domain is)
        for group in groups:
            p = group[0][1]
            if p is None or p.domain in domains:
                continue
            if (call := self._naming.get(p.domain)) is not None:
                calls.add(call)
                continue
            site = self._site_of.get(p.domain)
            if site is not None:
                sq = self._site_queues.get(site)
                if site in sites or site in self._asking:
                    continue
                if sq is not None and (sq.acquiring is not None or sq.live()):
                    continue
                sites.add(site)
            domains[p.domain] = None
        if domains:
            calls.add(self._name(domains, sites))
        if calls:
            # (not awaited directly: a cancelled wait must not cancel the others' call)
            await asyncio.wait(calls)

    def _name(self, domains: dict[str, None], sites: set[str]) -> asyncio.Future[None]:
        """Put `domains` (and the known `sites` among theirs) in the next lease call, made at
        once unless one is in flight; returns that call's future."""
        call = self._next_call
        if call is None:
            call = self._next_call = asyncio.get_running_loop().create_future()
        for domain in domains:
            self._naming[domain] = call
        self._next_domains.update(domains)
        self._next_sites |= sites
        self._asking |= sites
        if not self._calling:
            self._calling = True
            self._spawn(self._lease_calls())
        return call

    async def _lease_calls(self) -> None:
        """Make the lease calls _name gathers, one at a time, until none is left."""
        try:
            while self._next_domains:
                domains, self._next_domains = self._next_domains, {}
                sites, self._next_sites = self._next_sites, set()
                call, self._next_call = self._next_call, None
                try:
                    await self._lease_domains(list(domains), sites)
                finally:
                    self._asking -= sites  # (also when cancelled)
                    for domain in domains:
                        if self._naming.get(domain) is call:
                            del self._naming[domain]
                    if call is not None and not call.done():
                        call.set_result(None)
        finally:
            # (cancelled in a drain: what was gathered is not asked for; its mail is
            # handed back like mail whose site is unknown)
            self._calling = False
            if self._next_domains and not self._stopping:
                self._calling = True
                self._spawn(self._lease_calls())
            else:
                for domain in self._next_domains:
                    self._naming.pop(domain, None)
                self._asking -= self._next_sites
                self._next_domains, self._next_sites = {}, set()
                if self._next_call is not None and not self._next_call.done():
                    self._next_call.set_result(None)
                self._next_call = None

    async def _lease_domains(self, domains: list[str], sites: set[str]) -> None:
        """One call: a lease on the sites of `domains` (`sites`: the known ones among them,
        in _asking until it is answered)."""
        try:
            resp = await self._scheduler.AcquireLeases(
                scheduler_pb2.AcquireLeasesRequest(
                    deliverer_id=self.deliverer_id,
                    domains=domains,
                    connections=_CONNECTIONS,
                    release_lease_ids=self._take_releases(),
                ),
                timeout=5.0,
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("scheduler unavailable: %s", exc.code().name)
            resp = scheduler_pb2.AcquireLeasesResponse()
        self._asking -= sites
        self._learn_sites(resp)
        for lease in resp.leases:
            work = self._domain_leases[lease.lease_id] = LeaseWork(lease)
            sq = self._site_queues.get(lease.site_id)
            if sq is None:
                sq = self._site_queues[lease.site_id] = SiteQueue(lease.site_id)
            if sq.live():
                # (another lane of this process leased the site meanwhile: one is enough)
                self._spawn(self._release_domain_lease(work))
            else:
                sq.leases.append(work)  # (its mail is queued next; loops start then)
        for site in sites:  # (mail other lanes queued meanwhile)
            if (sq := self._site_queues.get(site)) is not None and sq.size:
                self._staff(sq)

    async def _paced(
        self, group: Group, work: LeaseWork, conn: SmtpConnection | None
    ) -> SmtpConnection | None:
        """Deliver `group` under `work` once its message rate allows (a lease's rate is
        shared by all of its connections); returns the connection to go on with."""
        for _ in group:
            await work.messages.wait(work.lease.max_message_rate)
        return await self._deliver(group, work, conn)

    async def _fit(self, conn: SmtpConnection, domain: str) -> SmtpConnection | None:
        """`conn` if it may carry mail for `domain` (see _serves), else None (closed): the
        domain goes elsewhere (another MX set, a route's port) or needs TLS it lacks, so a
        new connection is opened under the same lease. (What it serves is remembered while
        the domain's MX hosts are cached, _SERVES_FOR at most: a site's connection carries
        mail of the same few domains over and over.)"""
        now = time.monotonic()
        if conn.serves.get(domain, 0.0) > now:
            return conn
        if await self._serves(conn, domain):
            self._remember_serves(conn, domain, now)
            return conn
        await conn.close()
        return None

    async def _keep_in_hand_alive(self, stop: asyncio.Event) -> None:
        """Tell JetStream every third of ack_wait that the mail the loops hold is in
        progress: behind slow transactions, full sites or another site's queue it may wait
        longer than ack_wait, and must not be given to another deliverer meanwhile (a
        duplicate). A transaction's pointers are kept alive too while it lasts (_keep_alive),
        and they alone once `stop` is set: the drain hands the rest back, and waits for
        the transactions' replies (run() cancels this then)."""
        while True:
            # (ack_wait may shrink once the consumers' own is known: see _sub)
            await asyncio.sleep(max(0.05, min(1.0, self._ack_wait / 6)))
            try:
                await self._keep_alive_round(stopping=stop.is_set())
            except Exception:  # (a bug here must not end the keeping alive for good)
                log.exception("keeping mail in hand alive failed")

    async def _keep_alive_round(self, stopping: bool) -> None:
        now = time.monotonic()
        held: list[InHand] = list(self._in_flight)
        if not stopping:
            held += [
                *self._batches,
                *(q for sq in self._site_queues.values() for q in sq.entries()),
            ]
        for in_hand in held:
            if now - in_hand.alive > self._ack_wait / 3:
                try:
                    for group in in_hand.groups[in_hand.next :]:
                        for msg, _ in group:
                            await msg.in_progress()
                    in_hand.alive = now
                except NatsError as exc:  # (NATS away: the next round tries again)
                    log.warning("keeping mail in hand alive failed: %r", exc)
        if stopping:
            return
        # Mail kept alive must also be on its way: a queue with mail always has a
        # connection loop or a lease being asked for (a queue left with neither would keep
        # its mail here for good).
        for sq in list(self._site_queues.values()):
            if (
                sq.size
                and not sq.loops
                and sq.acquiring is None
                and sq.site not in self._asking
                and sq.site not in self._starved
                and not self._stopping
            ):
                log.warning("site %s: %d queued with no connection loop", sq.site, sq.size)
                self._staff(sq)

    async def _hand_back_busy(self, groups: list[Group]) -> None:
        """Give pointers back for a moment (their site had no connection for them)."""
        count_site_wait(sum(len(g) for g in groups), queued=False)
        for group in groups:
            for msg, _ in group:
                await self._nak(msg, busy_delay(delivered_count(msg)))

    def _learn_sites(self, resp: scheduler_pb2.AcquireLeasesResponse) -> None:
        """The domains' sites, and their MX hosts as the scheduler found them (so this
        process need not look them up again)."""
        self._site_of.update(resp.domain_sites)
        for domain, mx in resp.domain_mx.items():
            hosts = [MxHost(h.preference, h.host) for h in mx.hosts]
            self._resolver.learn_mx(domain, hosts, mx.ttl_seconds)

    def _remember_serves(self, conn: SmtpConnection, domain: str, now: float) -> None:
        known = self._resolver.known_mx(domain)
        conn.serves[domain] = now + (min(known[1], _SERVES_FOR) if known else _SERVES_FOR)

    async def _serves(self, conn: SmtpConnection, domain: str) -> bool:
        """Whether mail for `domain` may go through `conn` (opened for another domain of the
        same site): the host is one of the domain's MX hosts, on the port the domain's mail
        goes to, encrypted if the domain requires TLS."""
        if conn.port != self._port(domain) or (domain in self._require_tls and not conn.tls):
            return False
        try:
            return conn.host in {mx.host for mx in await self._resolver.mx(domain)}
        except (DnsPermanent, DnsTemporary):
            return False

    async def _acquire_domain_lease(
        self, domain: str, wait: float = 0.0, connections: int = 1
    ) -> LeaseWork | None:
        try:
            resp = await self._scheduler.AcquireLeases(
                scheduler_pb2.AcquireLeasesRequest(
                    deliverer_id=self.deliverer_id,
                    domain=domain,
                    wait_ms=int(wait * 1000),
                    connections=connections,
                ),
                timeout=5.0 + wait,
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("scheduler unavailable: %s", exc.code().name)
            return None
        self._learn_sites(resp)
        if not resp.leases:
            return None
        lease = resp.leases[0]
        work = LeaseWork(lease)
        self._domain_leases[lease.lease_id] = work
        return work

    async def _release_domain_lease(self, work: LeaseWork) -> None:
        """Give a site lease of hash-bucket mail back without waiting for the answer (if it
        is lost, the lease simply expires). Releases are gathered for _RELEASE_WINDOW (or
        ride along on a batch acquire made meanwhile): a lease goes back after its queue
        stayed empty for _LINGER, so nothing of this process waits for it, and another
        deliverer always has the rest of the site (a lease takes at most half of it)."""
        self._domain_leases.pop(work.lease.lease_id, None)
        self._releasing.append(work.lease.lease_id)
        if not self._release_in_flight:
            self._release_in_flight = True
            # (at once, not waiting for room among the settling: one such task at a time,
            # and a wait cancelled here would have left _release_in_flight set for good)
            self._spawn(self._release_pending())

    async def _release_pending(self) -> None:
        try:
            if not self._stopping:
                await asyncio.sleep(_RELEASE_WINDOW)
            while ids := self._take_releases():
                await self._release(*ids)
        finally:
            self._release_in_flight = False

    def _take_releases(self) -> list[str]:
        ids, self._releasing = self._releasing, []
        return ids

    async def _release(self, *lease_ids: str) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self._scheduler.ReleaseLeases(
                scheduler_pb2.ReleaseLeasesRequest(
                    deliverer_id=self.deliverer_id, lease_ids=lease_ids
                )
            )

    async def _hand_back(
        self, groups: list[list[tuple[Msg, messages_pb2.DeliveryPointer | None]]]
    ) -> None:
        """Give pointers back at once, un-delayed (a drain or a lost lease)."""
        for group in groups:
            for msg, _ in group:
                await self._nak(msg)

    async def _nak(self, msg: Msg, delay: float | None = None) -> None:
        """Give a pointer back undelivered (redelivered after `delay`), remembered as such."""
        self._given_back.add(_seq(msg), delivered_count(msg))
        await msg.nak(delay=delay)

    async def _delivered_elsewhere(self, p: messages_pb2.DeliveryPointer) -> bool:
        """Whether the recipient of a pointer that came back has a delivered event already:
        another deliverer sent it, and its ack was lost with its consumer's leader (this
        process's own deliveries are in _sent). If EVENTS cannot say, the pointer is sent
        (at least once)."""
        subject = names.event_subject(
            p.tenant_id, messages_pb2.EVENT_TYPE_DELIVERED, p.job_id, p.index
        )
        try:
            async with asyncio.timeout(_ELSEWHERE_WAIT):
                await self._js.get_last_msg(names.EVENTS_STREAM, subject)
        except NotFoundError:
            return False
        except Exception as exc:
            log.warning("delivered elsewhere? not known (%r): sending", exc)
            return False
        return True

    # -- one pointer -----------------------------------------------------------------------

    def _groups(
        self, msgs: list[Msg]
    ) -> list[list[tuple[Msg, messages_pb2.DeliveryPointer | None]]]:
        """Consecutive pointers of the same message go in one transaction (several RCPT TO),
        unless something in the message differs per recipient (VERP return path,
        substitutions, a bulk List-Unsubscribe link)."""
        groups: list[list[tuple[Msg, messages_pb2.DeliveryPointer | None]]] = []
        for msg in msgs:
            try:
                p: messages_pb2.DeliveryPointer | None = messages_pb2.DeliveryPointer.FromString(
                    msg.data
                )
            except Exception:
                p = None
            last = groups[-1] if groups else None
            if (
                p is not None
                and last is not None
                and last[0][1] is not None
                and last[0][1].message_id == p.message_id
                and len(last) < _MAX_RCPTS
                and self._groupable(p)
            ):
                last.append((msg, p))
            else:
                groups.append([(msg, p)])
        return groups

    def _groupable(self, p: messages_pb2.DeliveryPointer) -> bool:
        return (
            not self._cfg.deliverer.verp_domain
            and not p.substitutions
            and p.tier != messages_pb2.TIER_BULK
        )

    async def _deliver(
        self,
        group: list[tuple[Msg, messages_pb2.DeliveryPointer | None]],
        work: LeaseWork,
        conn: SmtpConnection | None,
    ) -> SmtpConnection | None:
        """One transaction in a span that continues the job's trace (the pointers of one
        message carry the same traceparent); its events are published inside it, and it
        ends when the transaction is settled. Without tracing, no span at all (the API's
        no-op one cost 4 % of the deliverer's CPU)."""
        if not tracing():
            return await self._transaction(group, work, conn, None)
        span = _tracer.start_span(
            "smtp deliver", context=extract(group[0][0].headers), kind=SpanKind.CLIENT
        )
        try:
            with trace.use_span(span, end_on_exit=False):
                if span.is_recording() and (p := group[0][1]) is not None:
                    span.set_attributes(
                        {
                            "sluice.site_id": work.lease.site_id,
                            "sluice.tier": names.tier_token(p.tier),
                            "sluice.job_id": p.job_id,
                            "sluice.message_id": p.message_id,
                            "smtp.recipients": len(group),
                        }
                    )
                return await self._transaction(group, work, conn, span)
        except BaseException:
            _end_span(span)
            raise

    async def _transaction(
        self,
        group: list[tuple[Msg, messages_pb2.DeliveryPointer | None]],
        work: LeaseWork,
        conn: SmtpConnection | None,
        span: Span | None,
    ) -> SmtpConnection | None:
        """Deliver one pointer, or several pointers of one message in one transaction:
        returns once the message is written, so that the next message's envelope goes out
        with its end (SmtpConnection.submit); the reply and the settling come in the
        background (_conclude), which ends `span`."""
        lease = work.lease
        items: list[tuple[Msg, messages_pb2.DeliveryPointer, int, float, float]] = []
        expired: list[tuple[Msg, messages_pb2.DeliveryPointer, int]] = []
        again: list[tuple[Msg, messages_pb2.DeliveryPointer, tuple[int, Outcome, str]]] = []
        unsure: list[tuple[Msg, messages_pb2.DeliveryPointer, int]] = []

        def place(msg: Msg, p: messages_pb2.DeliveryPointer, attempt: int) -> None:
            age = time.time() - p.accepted_at.ToNanoseconds() / 1e9
            horizon = self._cfg.horizon(names.tier_token(p.tier))
            if p.HasField("expires_at"):
                horizon = min(
                    horizon, (p.expires_at.ToNanoseconds() - p.accepted_at.ToNanoseconds()) / 1e9
                )
            if age >= horizon:
                expired.append((msg, p, attempt))
            else:
                items.append((msg, p, attempt, age, horizon))

        for msg, p in group:
            if p is None:
                log.error("undecodable pointer terminated (seq %s)", msg.metadata.sequence.stream)
                await msg.term()
                continue
            attempt = delivered_count(msg)
            if attempt > 1:
                if (sent := self._sent.get(p.delivery_id)) is not None:
                    again.append((msg, p, sent))
                    continue
                if self._given_back.get(_seq(msg)) != attempt - 1:
                    unsure.append((msg, p, attempt))
                    continue
            place(msg, p, attempt)
        if unsure:
            found = await asyncio.gather(*(self._delivered_elsewhere(p) for _, p, _ in unsure))
            for (msg, p, attempt), elsewhere in zip(unsure, found, strict=True):
                if not elsewhere:
                    place(msg, p, attempt)
                    continue
                log.info(
                    "delivered elsewhere before delivery=%s to=%s: acknowledged, not sent again",
                    p.delivery_id,
                    p.recipient,
                )
                try:
                    await msg.ack()
                except Exception as exc:  # (it comes back, and is looked for again)
                    log.warning("ack failed delivery=%s: %r", p.delivery_id, exc)
        if again:
            await asyncio.gather(*(self._settle_sent(msg, p, *sent) for msg, p, sent in again))
        if expired:  # (together: each event waits a few milliseconds for company)
            await asyncio.gather(
                *(
                    self._dead_letter(msg, p, n, messages_pb2.DEAD_LETTER_REASON_EXPIRED, None, "")
                    for msg, p, n in expired
                )
            )
        if not items:
            _end_span(span)
            return conn
        first = items[0][1]
        try:
            payload = await self._payload(first.payload_ref)
        except PayloadNotFound:
            await asyncio.gather(
                *(
                    self._dead_letter(
                        msg,
                        p,
                        attempt,
                        messages_pb2.DEAD_LETTER_REASON_EXPIRED,
                        None,
                        "payload_missing",
                    )
                    for msg, p, attempt, _, _ in items
                )
            )
            _end_span(span)
            return conn
        except StoreError as exc:
            log.warning("payload %s unreadable (%s); handing back", first.payload_ref, exc)
            for msg, *_ in items:
                await self._nak(msg, 5.0)
            _end_span(span)
            return conn
        tenant = await self._tenants.get(first.tenant_id)
        unsubscribe = ""
        if first.tier == messages_pb2.TIER_BULK and tenant is not None:
            unsubscribe = tenant.unsubscribe_url
        data = self._template(first.payload_ref, payload, unsubscribe).render(first)
        dkim_key = key_for(tenant, getattr(payload, "from").email.rpartition("@")[2].lower())
        if dkim_key is not None:
            try:
                data = sign(data, dkim_key)
            except DkimError as exc:
                log.warning("delivery=%s sent unsigned: %s", first.delivery_id, exc)
        outcomes: dict[str, Outcome] | None = None
        result: Awaitable[dict[str, Reply]] | None = None
        stop_keep_alive = self._keep_alive([(msg, p) for msg, p, *_ in items])
        try:
            if conn is None or not conn.usable or self._spent(conn, lease):
                if conn is not None:
                    await conn.close()
                await work.connections.wait(lease.max_connection_rate)
                conn = await self._connect(first.domain)
            result = await conn.submit(
                self._mail_from(first), [p.recipient for _, p, *_ in items], data
            )
        except DnsPermanent as exc:
            outcomes = {p.recipient: Bounced(None, "bad_domain") for _, p, *_ in items}
            log.info("delivery=%s: %s", first.delivery_id, exc)
        except (DnsTemporary, ConnectionLost) as exc:
            outcomes = {p.recipient: Deferred(None, str(exc)) for _, p, *_ in items}
            conn = None
        except BaseException:
            stop_keep_alive()
            raise
        # The reply and the settling (event, then ack / nak / dead letter) come in the
        # background, so the connection goes on with the next transaction meanwhile; a
        # crash before the ack means a redelivery, which at-least-once allows.
        host = conn.host if conn else ""
        conclude = self._conclude(items, result, outcomes, stop_keep_alive, lease, host, span)
        try:
            await self._background(conclude)
        except BaseException:  # (cancelled while waiting for room: it never runs)
            conclude.close()
            if asyncio.iscoroutine(result):
                result.close()
            stop_keep_alive()
            _end_span(span)
            raise
        return conn

    async def _conclude(
        self,
        items: list[tuple[Msg, messages_pb2.DeliveryPointer, int, float, float]],
        result: Awaitable[dict[str, Reply]] | None,
        outcomes: dict[str, Outcome] | None,
        stop_keep_alive: Callable[[], None],
        lease: scheduler_pb2.Lease,
        host: str,
        span: Span | None,
    ) -> None:
        """A transaction's end: its replies (unless it was decided without one), classified
        into outcomes, and each pointer settled."""
        try:
            if result is not None:
                try:
                    replies = await result
                    outcomes = {r: classify(reply, self._throttle) for r, reply in replies.items()}
                except ConnectionLost as exc:
                    outcomes = {p.recipient: Deferred(None, str(exc)) for _, p, *_ in items}
        finally:
            stop_keep_alive()
            if span is not None and outcomes is not None and span.is_recording():
                _trace_outcomes(span, host, outcomes)
            _end_span(span)
        assert outcomes is not None
        if len(items) == 1:
            msg, p, attempt, age, horizon = items[0]
            await self._settle(msg, p, attempt, age, horizon, outcomes[p.recipient], lease, host)
            return
        await asyncio.gather(
            *(
                self._settle(msg, p, attempt, age, horizon, outcomes[p.recipient], lease, host)
                for msg, p, attempt, age, horizon in items
            )
        )

    def _keep_alive(self, group: Group) -> Callable[[], None]:
        """Keep a transaction's pointers alive at JetStream while it lasts (a slow DATA must
        not look like a dead deliverer): it is mail in hand for _keep_in_hand_alive until
        what is returned is called. (A timer per transaction cost 2 % of the deliverer's
        CPU, and almost every transaction ends long before its first tick.)"""
        entry = InHand([group], time.monotonic())
        self._in_flight.add(entry)
        return lambda: self._in_flight.discard(entry)

    async def _background(self, work: Awaitable[Any]) -> None:
        """Run `work` in the background, at most _SETTLING at once (then wait for room)."""
        await self._settling.run(work)

    def _spawn(self, work: Awaitable[Any]) -> None:
        """Run `work` in the background now (from a callback: no waiting for room); a
        drain waits for it like for any settling."""
        self._settling.start(work)

    async def settle_all(self, within: float | None = None) -> None:
        """Wait for every background settle (a drain), for at most `within` seconds."""
        if not await self._settling.join(within):
            log.warning("drain: transactions left unsettled: %d", len(self._settling))

    async def _payload(self, ref: str) -> messages_pb2.Payload:
        """The payload a ref points at; "<uri>#<i>" is payload i of a streamed batch.
        Parsed objects are cached, so a batch or blast is read and parsed once (one read at
        a time: the loops that miss meanwhile wait for it)."""
        base, _, fragment = ref.partition("#")
        parsed = self._parsed.get(base)
        if parsed is None:
            parsed = await self._reads.do(base, lambda: self._read_payload(base, bool(fragment)))
        return parsed[int(fragment) if fragment else 0]

    async def _read_payload(self, base: str, batch: bool) -> Sequence[messages_pb2.Payload]:
        data = await self._store.get(base)
        parsed: Sequence[messages_pb2.Payload] = (
            messages_pb2.PayloadBatch.FromString(data).payloads
            if batch
            else [messages_pb2.Payload.FromString(data)]
        )
        self._parsed[base] = parsed
        if len(self._parsed) > self._cfg.deliverer.payload_cache_size:
            self._parsed.pop(next(iter(self._parsed)))
        return parsed

    def _template(
        self, ref: str, payload: messages_pb2.Payload, unsubscribe: str
    ) -> MessageTemplate:
        """The payload's message template, encoded once per payload (a blast's recipients
        share it) and kept as long as the payload."""
        key = (ref, unsubscribe)
        template = self._templates.get(key)
        if template is None:
            template = self._templates[key] = MessageTemplate(payload, unsubscribe)
            if len(self._templates) > self._cfg.deliverer.payload_cache_size:
                self._templates.pop(next(iter(self._templates)))
        return template

    def _mail_from(self, p: messages_pb2.DeliveryPointer) -> str:
        verp = self._cfg.deliverer.verp_domain
        return f"bounce+{p.delivery_id}@{verp}" if verp else p.envelope_from

    def _spent(self, conn: SmtpConnection, lease: scheduler_pb2.Lease) -> bool:
        """Whether `conn` has carried the transactions a connection may (those still
        awaiting their end's reply count)."""
        limit = lease.max_deliveries_per_connection
        return bool(limit) and conn.transactions >= limit

    def _port(self, domain: str) -> int:
        """The port the domain's mail goes to: its route's, else [deliverer] smtp_port."""
        route = self._resolver.route(domain)
        return (route[1] if route else None) or self._cfg.deliverer.smtp_port

    async def _connect(self, domain: str) -> SmtpConnection:
        """A connection to the first reachable MX host of domain (preference order)."""
        # A connection this loop dropped just now may keep its socket until the event
        # loop's next turn (asyncio closes it from a callback): that turn first, so the
        # site never has one connection more than the lease allows, not even for a moment
        # (after 421s at RCPT, loops reconnecting together made the test server count 5
        # connections against a cap of 3).
        await asyncio.sleep(0)
        errors: list[str] = []
        port = self._port(domain)
        for mx in self._resolver.in_order(await self._resolver.mx(domain)):
            try:
                addresses = (
                    [mx.host] if _is_ip(mx.host) else await self._resolver.addresses(mx.host)
                )
            except (DnsPermanent, DnsTemporary) as exc:
                errors.append(str(exc))
                continue
            for address in addresses:
                conn = SmtpConnection(
                    mx.host,
                    address,
                    port,
                    self._cfg.deliverer.ehlo_name,
                    self._cfg.deliverer.connect_timeout,
                    self._cfg.deliverer.command_timeout,
                    require_tls=domain in self._require_tls,
                    data_timeout=self._cfg.deliverer.data_timeout,
                )
                try:
                    await conn.open()
                    self._remember_serves(conn, domain, time.monotonic())
                    return conn
                except ConnectionLost as exc:
                    errors.append(str(exc))
        raise ConnectionLost("; ".join(errors) or f"{domain}: no reachable MX host")

    async def _settle(
        self,
        msg: Msg,
        p: messages_pb2.DeliveryPointer,
        attempt: int,
        age: float,
        horizon: float,
        outcome: Outcome,
        lease: scheduler_pb2.Lease,
        mx_host: str,
    ) -> None:
        self._report(lease, p, outcome)
        try:
            await self._settle_once(msg, p, attempt, age, horizon, outcome, mx_host)
        except _UNSTORED as exc:
            # A stream between leaders (its leader's node lost: a few seconds) stores
            # nothing. Letting the pointer go would send a delivered message again after
            # ack_wait (a cluster test that killed a node saw 161 repeats of 990), so its
            # settling is tried again, the pointer kept in hand meanwhile; the event's
            # Nats-Msg-Id makes a repeat of one that did land harmless.
            await self._settle_again(
                exc, msg, lambda: self._settle_once(msg, p, attempt, age, horizon, outcome, mx_host)
            )

    async def _settle_sent(
        self,
        msg: Msg,
        p: messages_pb2.DeliveryPointer,
        attempt: int,
        outcome: Outcome,
        mx_host: str,
    ) -> None:
        """A pointer this process delivered comes back (its ack was lost with its consumer's
        leader, or its settling was given up): settled again as it was then (the event under
        its first id, a repeat of one stored already is dropped by its Nats-Msg-Id), not
        sent again."""
        log.info("delivered before delivery=%s to=%s: settled again", p.delivery_id, p.recipient)
        try:
            await self._settle_once(msg, p, attempt, 0.0, 0.0, outcome, mx_host)
        except Exception as exc:
            log.error("settling again failed (the pointer comes back): %r", exc)

    async def _settle_again(
        self, exc: Exception, msg: Msg, settle: Callable[[], Awaitable[None]]
    ) -> None:
        """Try a settling JetStream could not store again, after a pause that doubles up to
        _UNSTORED_PAUSE, for as long as the pointer's ack_wait (the pointer kept in hand by
        in_progress meanwhile); then let the failure through (the pointer comes back)."""
        deadline = time.monotonic() + self._ack_wait
        pause = 0.1
        while time.monotonic() + pause < deadline:
            # (once a warning: an election fails every settling in flight, several times)
            log.log(
                logging.WARNING if pause == 0.1 else logging.INFO,
                "settling not stored (trying again in %.1fs): %r",
                pause,
                exc,
            )
            with contextlib.suppress(Exception):  # (the consumer's leader may be gone too)
                await msg.in_progress()
            await asyncio.sleep(pause)
            pause = min(2 * pause, _UNSTORED_PAUSE)
            try:
                await settle()
                return
            except _UNSTORED as again:
                exc = again
        raise exc

    async def _settle_once(
        self,
        msg: Msg,
        p: messages_pb2.DeliveryPointer,
        attempt: int,
        age: float,
        horizon: float,
        outcome: Outcome,
        mx_host: str,
    ) -> None:
        reply = outcome.reply
        match outcome:
            case Delivered():
                self._sent.add(p.delivery_id, (attempt, outcome, mx_host))
                await self._event(
                    p, messages_pb2.EVENT_TYPE_DELIVERED, attempt, reply, mx_host=mx_host
                )
                # (no reply awaited: the ack is written at once, and at worst a lost ack is
                # a redelivery, as a crash before it would be; waiting for the reply cost
                # a request per message)
                await msg.ack()
                log.info(
                    "delivered delivery=%s to=%s reply=%s",
                    p.delivery_id,
                    p.recipient,
                    reply.code if reply else "",
                )
            case Deferred(reason=reason):
                delay = next_delay(age, self._cfg.retry.ladder, self._cfg.retry.jitter)
                # Never wait past the horizon: the next attempt then dead-letters on time.
                delay = max(0.0, min(delay, horizon - age + 0.05))
                await self._event(
                    p, messages_pb2.EVENT_TYPE_DEFERRED, attempt, reply, mx_host=mx_host
                )
                await self._nak(msg, delay)
                log.info(
                    "deferred delivery=%s to=%s retry_in=%.1fs reason=%s",
                    p.delivery_id,
                    p.recipient,
                    delay,
                    reply.text if reply else reason,
                )
            case Bounced(category=category):
                await self._suppress(p, category, reply)
                await self._dead_letter(
                    msg,
                    p,
                    attempt,
                    messages_pb2.DEAD_LETTER_REASON_BOUNCED,
                    reply,
                    category,
                    mx_host,
                )

    async def _suppress(
        self, p: messages_pb2.DeliveryPointer, category: str, reply: Reply | None
    ) -> None:
        """A mailbox that does not exist stays suppressed for this tenant, a full one for a
        while: later sends to it get a `suppressed` event instead of another bounce."""
        rules = self._cfg.suppression
        if reply is None or category not in (*rules.hard_categories, *rules.soft_categories):
            return
        reason = f"{category}: {reply.code} {reply.text}"
        source = messages_pb2.SUPPRESSION_SOURCE_BOUNCE
        if category in rules.hard_categories:
            await suppressions.put(self._js, p.tenant_id, p.recipient, reason, source)
        else:  # a soft bounce never shortens an entry already there
            await suppressions.put_unless_longer(
                self._js, p.tenant_id, p.recipient, reason, source, rules.soft_ttl
            )

    async def _event(
        self,
        p: messages_pb2.DeliveryPointer,
        event_type: messages_pb2.EventType.ValueType,
        attempt: int,
        reply: Reply | None,
        category: str = "",
        mx_host: str = "",
    ) -> None:
        event_id = f"evt_{p.delivery_id}_{names.event_token(event_type)}_{attempt}"
        smtp_reply = reply.proto() if reply else None
        await self._events.publish(
            *event_message(p, event_type, event_id, smtp_reply, category, mx_host)
        )
        count_published(p, event_type)

    async def _dead_letter(
        self,
        msg: Msg,
        p: messages_pb2.DeliveryPointer,
        attempt: int,
        reason: messages_pb2.DeadLetterReason.ValueType,
        reply: Reply | None,
        category: str,
        mx_host: str = "",
    ) -> None:
        """DLQ record first, then the event, then TERM: a crash in between repeats, never loses."""
        await publish_dead_letter(self._js, p, reason, attempt, reply.proto() if reply else None)
        event_type = (
            messages_pb2.EVENT_TYPE_BOUNCED
            if reason == messages_pb2.DEAD_LETTER_REASON_BOUNCED
            else messages_pb2.EVENT_TYPE_FAILED
        )
        await self._event(p, event_type, attempt, reply, category, mx_host)
        await msg.term()
        log.info(
            "dead-lettered delivery=%s to=%s reason=%s category=%s",
            p.delivery_id,
            p.recipient,
            messages_pb2.DeadLetterReason.Name(reason),
            category,
        )

    def _report(
        self, lease: scheduler_pb2.Lease, p: messages_pb2.DeliveryPointer, outcome: Outcome
    ) -> None:
        if isinstance(outcome, Deferred) and outcome.throttled:
            reply = outcome.reply
            self._throttles.append(
                scheduler_pb2.Outcome(
                    lease_id=lease.lease_id,
                    site_id=lease.site_id,
                    domain=p.domain,
                    tier=p.tier,
                    tenant_id=p.tenant_id,
                    kind=scheduler_pb2.OUTCOME_KIND_THROTTLED,
                    reply=reply.proto() if reply else None,
                )
            )
            return
        key = (lease.lease_id, lease.site_id, _OUTCOME_KIND[type(outcome)])
        self._tallies[key] = self._tallies.get(key, 0) + 1
