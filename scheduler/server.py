"""Runs the scheduler: the SchedulerService gRPC server over the lease policy.

Several scheduler processes may run; the one holding the leader lock (scheduler/leader.py)
is active, the others are standbys that answer every call with UNAVAILABLE, so deliverers
go to the active one (deliverer/schedclient.py). docs/ha.md describes a takeover.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import grpc
from nats.js import JetStreamContext

from scheduler.leader import LeaderLock
from scheduler.reaper import Reaper
from scheduler.service import Scheduler
from scheduler.shaping import Rules, load_rules
from sluice.config import Config
from sluice.grpctls import add_port, server_credentials
from sluice.health import ServiceHealth, nats_problems
from sluice.nats_layout import connect, ensure_layout
from sluice.resolver import Resolver
from sluice.v1 import scheduler_pb2, scheduler_pb2_grpc

__all__ = ["Role", "serve"]

log = logging.getLogger(__name__)

Ctx = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")


class Role:
    """Whether this process is the active scheduler, and its policy while it is."""

    def __init__(
        self, cfg: Config, js: JetStreamContext, lock: LeaderLock, rules: Rules, resolver: Resolver
    ) -> None:
        self._cfg = cfg
        self._js = js
        self.lock = lock
        self._rules = rules
        self._resolver = resolver
        self._scheduler: Scheduler | None = None
        # No new leases before this (time.monotonic()): a takeover waits out the old leases.
        self.grants_from = 0.0

    def active(self) -> Scheduler | None:
        """The policy, if this process holds the lock right now."""
        return self._scheduler if self._scheduler is not None and self.lock.valid() else None

    def why_not(self) -> str:
        if self._scheduler is None:
            holder = self.lock.seen_holder
            return (
                f"standby scheduler {self.lock.holder}: not the leader"
                f" (active: {holder or 'none yet'}); ask the active scheduler"
            )
        return (
            f"scheduler {self.lock.holder} cannot renew its leader lock (NATS unreachable?);"
            " not granting until it can"
        )

    async def activate(self) -> Scheduler:
        """Start the policy with a fresh lease table (the lock was just won)."""
        scheduler = Scheduler(self._cfg, self._js, self._rules, self._resolver)
        await scheduler.start()
        drain = self.lock.drain if self.lock.took_over else 0.0
        self.grants_from = time.monotonic() + drain
        self._scheduler = scheduler
        if drain:
            log.info(
                "scheduler %s is active (took over); no new leases for %.1fs while the"
                " previous leader's leases run out",
                self.lock.holder,
                drain,
            )
        else:
            log.info("scheduler %s is active", self.lock.holder)
        return scheduler

    def deactivate(self) -> None:
        self._scheduler = None


class Refused(Exception):
    """A call refused with a gRPC status (unary: the call's status; on a Leases stream: the
    request's error, or the stream's end for UNAVAILABLE)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, role: Role) -> None:
        self._role = role
        # The open Leases streams' outboxes (see end_streams).
        self._streams: set[asyncio.Queue[scheduler_pb2.LeasesResponse | Refused | None]] = set()

    def end_streams(self, why: str) -> None:
        """End every open Leases stream with UNAVAILABLE (a stopping scheduler does this
        before stopping its server, which then has no stream to wait for or cancel)."""
        for out in self._streams:
            out.put_nowait(Refused(grpc.StatusCode.UNAVAILABLE, why))

    def _active(self) -> Scheduler:
        s = self._role.active()
        if s is None:
            raise Refused(grpc.StatusCode.UNAVAILABLE, self._role.why_not())
        return s

    def _still(self, s: Scheduler) -> None:
        """After a call: were we the leader throughout? Grants made after the lock lapsed
        must not reach the deliverer (a new leader may already count the connections)."""
        if self._role.active() is not s:
            raise Refused(grpc.StatusCode.UNAVAILABLE, self._role.why_not())

    @staticmethod
    def _need_id(deliverer_id: str) -> None:
        if not deliverer_id:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "deliverer_id is required")

    # -- the calls, unary or on a stream -----------------------------------------------

    async def _acquire(
        self, request: scheduler_pb2.AcquireLeasesRequest
    ) -> scheduler_pb2.AcquireLeasesResponse:
        self._need_id(request.deliverer_id)
        s = self._active()
        if request.release_lease_ids:  # (also while no grants are made yet)
            s.release(request.deliverer_id, list(request.release_lease_ids))
        if time.monotonic() < self._role.grants_from:
            return scheduler_pb2.AcquireLeasesResponse()
        if request.domain or request.domains:
            domains = [*request.domains, *([request.domain] if request.domain else [])]
            resp = await s.acquire_domains(
                request.deliverer_id,
                domains,
                min(request.wait_ms, 5000) / 1000,
                max(1, request.connections),
            )
        else:
            room = 0 if request.lanes_only else max(1, request.max_leases)
            leases = await s.acquire(request.deliverer_id, room)
            resp = scheduler_pb2.AcquireLeasesResponse(leases=leases)
        self._still(s)
        return resp

    async def _renew(
        self, request: scheduler_pb2.RenewLeasesRequest
    ) -> scheduler_pb2.RenewLeasesResponse:
        self._need_id(request.deliverer_id)
        s = self._active()
        # After a takeover the leases are unknown here and come back lost: their holders
        # stop at once instead of at expiry.
        resp = await s.renew(request.deliverer_id, list(request.lease_ids))
        self._still(s)
        return resp

    def _release(self, request: scheduler_pb2.ReleaseLeasesRequest) -> None:
        self._need_id(request.deliverer_id)
        self._active().release(request.deliverer_id, list(request.lease_ids))

    async def _report(self, request: scheduler_pb2.ReportOutcomesRequest) -> None:
        self._need_id(request.deliverer_id)
        await self._active().report(list(request.outcomes))

    @staticmethod
    async def _unary(call: Awaitable[T], context: Ctx) -> T:
        try:
            return await call
        except Refused as r:
            await context.abort(r.code, r.details)
            raise AssertionError("abort returned") from r  # pragma: no cover

    async def AcquireLeases(  # noqa: N802 - gRPC method name
        self, request: scheduler_pb2.AcquireLeasesRequest, context: Ctx
    ) -> scheduler_pb2.AcquireLeasesResponse:
        return await self._unary(self._acquire(request), context)

    async def RenewLeases(  # noqa: N802
        self, request: scheduler_pb2.RenewLeasesRequest, context: Ctx
    ) -> scheduler_pb2.RenewLeasesResponse:
        return await self._unary(self._renew(request), context)

    async def ReleaseLeases(  # noqa: N802
        self, request: scheduler_pb2.ReleaseLeasesRequest, context: Ctx
    ) -> scheduler_pb2.ReleaseLeasesResponse:
        async def release() -> scheduler_pb2.ReleaseLeasesResponse:
            self._release(request)
            return scheduler_pb2.ReleaseLeasesResponse()

        return await self._unary(release(), context)

    async def ReportOutcomes(  # noqa: N802
        self, request: scheduler_pb2.ReportOutcomesRequest, context: Ctx
    ) -> scheduler_pb2.ReportOutcomesResponse:
        async def report() -> scheduler_pb2.ReportOutcomesResponse:
            await self._report(request)
            return scheduler_pb2.ReportOutcomesResponse()

        return await self._unary(report(), context)

    async def ListSites(  # noqa: N802
        self, request: scheduler_pb2.ListSitesRequest, context: Ctx
    ) -> scheduler_pb2.ListSitesResponse:
        async def sites() -> scheduler_pb2.ListSitesResponse:
            return await self._active().sites()

        return await self._unary(sites(), context)

    async def Leases(  # noqa: N802
        self, request_iterator: AsyncIterator[scheduler_pb2.LeasesRequest], context: Ctx
    ) -> AsyncIterator[scheduler_pb2.LeasesResponse]:
        """The calls of one deliverer on one stream. Releases are applied as they are read
        (so before anything sent after them); every other request runs in a task of its
        own, and its response is written when it is ready."""
        out: asyncio.Queue[scheduler_pb2.LeasesResponse | Refused | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()

        async def answer(request: scheduler_pb2.LeasesRequest) -> None:
            resp = scheduler_pb2.LeasesResponse(id=request.id, outcome_counts=True)
            try:
                match request.WhichOneof("call"):
                    case "acquire":
                        resp.acquire.CopyFrom(await self._acquire(request.acquire))
                    case "renew":
                        resp.renew.CopyFrom(await self._renew(request.renew))
                    case "report":
                        await self._report(request.report)
                        resp.report.SetInParent()
                    case "release":
                        self._release(request.release)
                        resp.release.SetInParent()
                    case _:
                        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "a request without a call")
            except Refused as r:
                if r.code == grpc.StatusCode.UNAVAILABLE:
                    out.put_nowait(r)  # the stream ends: ask the leader
                    return
                resp.error_code, resp.error_message = r.code.value[0], r.details
            except Exception as exc:
                # A bug must not leave the caller waiting out its deadline for an answer
                # that never comes: it gets INTERNAL now (as a unary call would).
                log.exception("Leases: %s call failed", request.WhichOneof("call"))
                resp.error_code = grpc.StatusCode.INTERNAL.value[0]
                resp.error_message = f"{type(exc).__name__}: {exc}"
            if request.id:
                out.put_nowait(resp)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    if request.WhichOneof("call") == "release":
                        await answer(request)  # (synchronous: nothing to wait for)
                        continue
                    task = asyncio.create_task(answer(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if running:
                    await asyncio.wait(set(running))
            finally:
                out.put_nowait(None)

        reader = asyncio.create_task(read())
        self._streams.add(out)
        try:
            while (item := await out.get()) is not None:
                if isinstance(item, Refused):
                    await context.abort(item.code, item.details)
                yield item
        finally:
            self._streams.discard(out)
            reader.cancel()
            for task in list(running):
                task.cancel()


async def _lead(
    cfg: Config,
    js: JetStreamContext,
    role: Role,
    stop: asyncio.Event,
    scheduler: Scheduler | None = None,
) -> None:
    """The active scheduler's background work, for as long as it holds the lock. If it
    cannot start (NATS failing over: reading its state times out), it gives the lock up and
    stands by again; raising here ended the scheduler's service for good."""
    if scheduler is None:
        try:
            scheduler = await role.activate()
        except Exception as exc:
            log.warning("scheduler %s could not take over (%r); standing by", role.lock.holder, exc)
            role.deactivate()
            with contextlib.suppress(Exception):
                await role.lock.release()
            return
    # The background work ends with this leadership, told by `ended` as well as cancelled:
    # on Python 3.11 a cancellation that meets a message arriving in nats-py's fetch is lost,
    # and the task went on until the process stopped (a cancelled scheduler never ended).
    ended = asyncio.Event()
    relay = asyncio.create_task(stop.wait())
    relay.add_done_callback(lambda _: ended.set())
    backlog = asyncio.create_task(scheduler.run_backlog(ended))
    # The active scheduler also runs the reaper (MaxDeliver-exhausted mail -> dead letters).
    reaper = asyncio.create_task(Reaper(js).run(ended, cfg.scheduler.sweep_interval))
    try:
        await role.lock.hold(stop)
    finally:
        ended.set()
        role.deactivate()
        for task in (relay, backlog, reaper):
            task.cancel()
        await asyncio.gather(relay, backlog, reaper, return_exceptions=True)


async def serve(cfg: Config, stop: asyncio.Event) -> None:
    # Read the TLS files first: a missing one is a config error before anything starts.
    tls = server_credentials(
        cfg.scheduler.tls_cert_file, cfg.scheduler.tls_key_file, cfg.scheduler.tls_client_ca_file
    )
    nc = await connect(cfg, "sluice-scheduler")
    js = nc.jetstream()
    await ensure_layout(js, cfg)
    lock = LeaderLock(
        js,
        f"{cfg.scheduler.listen} ({socket.gethostname()} pid {os.getpid()})",
        cfg.scheduler.leader_ttl,
        cfg.scheduler.lease_ttl,
    )
    role = Role(cfg, js, lock, load_rules(cfg.scheduler.shaping or None), Resolver(cfg.dns))
    # One try before listening: a lone scheduler is active by the time it answers.
    try:
        won = await lock.try_acquire()
    except Exception as exc:
        log.warning("leader lock: %r", exc)
        won = False
    first = await role.activate() if won else None
    # One scheduler per address: a second one must fail to bind, not share the port.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    servicer = SchedulerServicer(role)
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(servicer, server)
    health = ServiceHealth("scheduler", lambda: nats_problems(nc))
    health.add_to(server, "sluice.v1.SchedulerService")
    add_port(server, cfg.scheduler.listen, tls)
    await server.start()
    log.info("scheduler: grpc on %s%s", cfg.scheduler.listen, " (TLS)" if tls else "")
    try:
        await health.start(cfg.telemetry, stop)
        while first is not None or await lock.acquire(stop):
            await _lead(cfg, js, role, stop, first)
            first = None
    finally:
        servicer.end_streams(f"scheduler {lock.holder} is stopping")
        # (bounded: a stop that hangs on an RPC must not keep the process, or a test, alive)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.stop(grace=2), 5)
        # A clean stop hands the lock over at once (the successor still waits out our leases).
        await lock.release()
        await health.close()
        await nc.close()
