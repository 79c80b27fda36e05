"""Runs the scheduler: the SchedulerService gRPC server over the lease policy."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc

from scheduler.reaper import Reaper
from scheduler.service import Scheduler
from scheduler.shaping import load_rules
from sluice.config import Config
from sluice.health import ServiceHealth, nats_problems
from sluice.nats_layout import connect, ensure_layout
from sluice.resolver import Resolver
from sluice.v1 import scheduler_pb2, scheduler_pb2_grpc

__all__ = ["serve"]

log = logging.getLogger(__name__)

Ctx = grpc.aio.ServicerContext[Any, Any]


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, scheduler: Scheduler) -> None:
        self._s = scheduler

    @staticmethod
    async def _need_id(deliverer_id: str, context: Ctx) -> None:
        if not deliverer_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "deliverer_id is required")

    async def AcquireLeases(  # noqa: N802 - gRPC method name
        self, request: scheduler_pb2.AcquireLeasesRequest, context: Ctx
    ) -> scheduler_pb2.AcquireLeasesResponse:
        await self._need_id(request.deliverer_id, context)
        if request.domain:
            leases = await self._s.acquire_domain(request.deliverer_id, request.domain)
            return scheduler_pb2.AcquireLeasesResponse(leases=leases)
        leases = await self._s.acquire(request.deliverer_id, max(1, request.max_leases))
        return scheduler_pb2.AcquireLeasesResponse(leases=leases)

    async def RenewLeases(  # noqa: N802
        self, request: scheduler_pb2.RenewLeasesRequest, context: Ctx
    ) -> scheduler_pb2.RenewLeasesResponse:
        await self._need_id(request.deliverer_id, context)
        return await self._s.renew(request.deliverer_id, list(request.lease_ids))

    async def ReleaseLeases(  # noqa: N802
        self, request: scheduler_pb2.ReleaseLeasesRequest, context: Ctx
    ) -> scheduler_pb2.ReleaseLeasesResponse:
        await self._need_id(request.deliverer_id, context)
        self._s.release(request.deliverer_id, list(request.lease_ids))
        return scheduler_pb2.ReleaseLeasesResponse()

    async def ReportOutcomes(  # noqa: N802
        self, request: scheduler_pb2.ReportOutcomesRequest, context: Ctx
    ) -> scheduler_pb2.ReportOutcomesResponse:
        await self._need_id(request.deliverer_id, context)
        await self._s.report(list(request.outcomes))
        return scheduler_pb2.ReportOutcomesResponse()

    async def ListSites(  # noqa: N802
        self, request: scheduler_pb2.ListSitesRequest, context: Ctx
    ) -> scheduler_pb2.ListSitesResponse:
        return await self._s.sites()


async def serve(cfg: Config, stop: asyncio.Event) -> None:
    nc = await connect(cfg, "sluice-scheduler")
    js = nc.jetstream()
    await ensure_layout(js, cfg)
    scheduler = Scheduler(cfg, js, load_rules(cfg.scheduler.shaping or None), Resolver(cfg.dns))
    await scheduler.start()
    # One scheduler per address: a second one must fail to bind, not share the port.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(SchedulerServicer(scheduler), server)
    health = ServiceHealth("scheduler", lambda: nats_problems(nc))
    health.add_to(server, "sluice.v1.SchedulerService")
    server.add_insecure_port(cfg.scheduler.listen)
    await server.start()
    log.info("scheduler: grpc on %s", cfg.scheduler.listen)
    backlog = asyncio.create_task(scheduler.run_backlog(stop))
    # The scheduler process also runs the reaper (MaxDeliver-exhausted mail -> dead letters).
    reaper = asyncio.create_task(Reaper(js).run(stop, cfg.scheduler.sweep_interval))
    try:
        await health.start(cfg.telemetry, stop)
        await stop.wait()
    finally:
        backlog.cancel()
        reaper.cancel()
        await server.stop(grace=2)
        await health.close()
        await nc.close()
