"""Runs the scheduler: the SchedulerService gRPC server over the lease policy.

Several scheduler processes may run; the one holding the leader lock (scheduler/leader.py)
is active, the others are standbys that answer every call with UNAVAILABLE, so deliverers
go to the active one (deliverer/schedclient.py). docs/ha.md describes a takeover.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any, NoReturn

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


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, role: Role) -> None:
        self._role = role

    async def _unavailable(self, context: Ctx) -> NoReturn:
        await context.abort(grpc.StatusCode.UNAVAILABLE, self._role.why_not())
        raise AssertionError("abort returned")  # pragma: no cover

    async def _active(self, context: Ctx) -> Scheduler:
        s = self._role.active()
        if s is None:
            await self._unavailable(context)
        return s

    async def _still(self, s: Scheduler, context: Ctx) -> None:
        """After a call: were we the leader throughout? Grants made after the lock lapsed
        must not reach the deliverer (a new leader may already count the connections)."""
        if self._role.active() is not s:
            await self._unavailable(context)

    @staticmethod
    async def _need_id(deliverer_id: str, context: Ctx) -> None:
        if not deliverer_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "deliverer_id is required")

    async def AcquireLeases(  # noqa: N802 - gRPC method name
        self, request: scheduler_pb2.AcquireLeasesRequest, context: Ctx
    ) -> scheduler_pb2.AcquireLeasesResponse:
        await self._need_id(request.deliverer_id, context)
        s = await self._active(context)
        if request.release_lease_ids:  # (also while no grants are made yet)
            s.release(request.deliverer_id, list(request.release_lease_ids))
        if time.monotonic() < self._role.grants_from:
            return scheduler_pb2.AcquireLeasesResponse()
        if request.domain or request.domains:
            domains = [*request.domains, *([request.domain] if request.domain else [])]
            resp = await s.acquire_domains(
                request.deliverer_id, domains, min(request.wait_ms, 5000) / 1000
            )
        else:
            leases = await s.acquire(request.deliverer_id, max(1, request.max_leases))
            resp = scheduler_pb2.AcquireLeasesResponse(leases=leases)
        await self._still(s, context)
        return resp

    async def RenewLeases(  # noqa: N802
        self, request: scheduler_pb2.RenewLeasesRequest, context: Ctx
    ) -> scheduler_pb2.RenewLeasesResponse:
        await self._need_id(request.deliverer_id, context)
        s = await self._active(context)
        # After a takeover the leases are unknown here and come back lost: their holders
        # stop at once instead of at expiry.
        resp = await s.renew(request.deliverer_id, list(request.lease_ids))
        await self._still(s, context)
        return resp

    async def ReleaseLeases(  # noqa: N802
        self, request: scheduler_pb2.ReleaseLeasesRequest, context: Ctx
    ) -> scheduler_pb2.ReleaseLeasesResponse:
        await self._need_id(request.deliverer_id, context)
        s = await self._active(context)
        s.release(request.deliverer_id, list(request.lease_ids))
        return scheduler_pb2.ReleaseLeasesResponse()

    async def ReportOutcomes(  # noqa: N802
        self, request: scheduler_pb2.ReportOutcomesRequest, context: Ctx
    ) -> scheduler_pb2.ReportOutcomesResponse:
        await self._need_id(request.deliverer_id, context)
        s = await self._active(context)
        await s.report(list(request.outcomes))
        return scheduler_pb2.ReportOutcomesResponse()

    async def ListSites(  # noqa: N802
        self, request: scheduler_pb2.ListSitesRequest, context: Ctx
    ) -> scheduler_pb2.ListSitesResponse:
        s = await self._active(context)
        return await s.sites()


async def _lead(
    cfg: Config,
    js: JetStreamContext,
    role: Role,
    stop: asyncio.Event,
    scheduler: Scheduler | None = None,
) -> None:
    """The active scheduler's background work, for as long as it holds the lock."""
    scheduler = scheduler or await role.activate()
    backlog = asyncio.create_task(scheduler.run_backlog(stop))
    # The active scheduler also runs the reaper (MaxDeliver-exhausted mail -> dead letters).
    reaper = asyncio.create_task(Reaper(js).run(stop, cfg.scheduler.sweep_interval))
    try:
        await role.lock.hold(stop)
    finally:
        role.deactivate()
        backlog.cancel()
        reaper.cancel()
        await asyncio.gather(backlog, reaper, return_exceptions=True)


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
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(SchedulerServicer(role), server)
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
        await server.stop(grace=2)
        # A clean stop hands the lock over at once (the successor still waits out our leases).
        await lock.release()
        await health.close()
        await nc.close()
