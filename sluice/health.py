"""Health of a service process: liveness, readiness, metrics and the gRPC health service.

Each service declares how it knows it is ready — a `Check`, an async function returning what
is missing (empty: ready) — in a `ServiceHealth`, starts it once it is connected and closes it
last in its clean-up. `ServiceHealth` then

- registers `grpc.health.v1.Health` on the service's own gRPC server, if it has one
  (`add_to`, before that server starts), and
- joins the process's ops servers, shared by every service the process runs (`sluice dev`
  runs all five in one): HTTP on `[telemetry] ops_listen` (`/healthz`, `/readyz`,
  `/metrics`) and a gRPC server carrying only the health service on
  `[telemetry] health_grpc_listen`. Either is off when its address is empty.

The gRPC status follows a poll of the check every `POLL_INTERVAL`; `/readyz` runs the checks
when asked. From the moment a service is told to stop it reports NOT_SERVING ("shutting
down") while it drains, so a load balancer stops sending before the listeners close.
docs/health.md describes the endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, ClassVar

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from nats.aio.client import Client as NatsClient
from prometheus_client import REGISTRY
from prometheus_client.aiohttp import make_aiohttp_handler

from sluice import names
from sluice.config import TelemetryConfig

__all__ = [
    "Check",
    "ServiceHealth",
    "grpc_service_name",
    "nats_problems",
]

log = logging.getLogger(__name__)

# A check answers what is missing; empty means ready.
Check = Callable[[], Awaitable[list[str]]]

# How often the gRPC health status is brought up to date, and how long one check may take.
POLL_INTERVAL = 1.0
CHECK_TIMEOUT = 2.0

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def grpc_service_name(service: str) -> str:
    """The grpc.health.v1 service name of a Sluice service, e.g. "sluice.expander"."""
    return f"sluice.{service}"


async def nats_problems(nc: NatsClient, consumers: Iterable[tuple[str, str]] = ()) -> list[str]:
    """What is missing of NATS: the connection, the JetStream streams and buckets of
    docs/nats.md, and the given (stream, consumer) pairs. One request for the streams (KV
    buckets are streams named KV_<bucket>) and one per consumer."""
    if not nc.is_connected:
        state = "reconnecting" if nc.is_reconnecting else "closed"
        return [f"nats: not connected ({state})"]
    try:
        reply = await nc.request("$JS.API.STREAM.NAMES", b"{}", timeout=CHECK_TIMEOUT)
        data = json.loads(reply.data)
    except Exception as exc:
        return [f"nats: JetStream did not answer ({type(exc).__name__})"]
    if "error" in data:
        return [f"nats: JetStream: {data['error'].get('description', data['error'])}"]
    present = set(data.get("streams") or ())
    problems = [f"nats: stream {s} missing" for s in names.STREAMS if s not in present]
    problems += [f"nats: bucket {b} missing" for b in names.KV_BUCKETS if f"KV_{b}" not in present]
    for stream, consumer in consumers:
        if stream not in present:
            continue  # already named
        try:
            reply = await nc.request(
                f"$JS.API.CONSUMER.INFO.{stream}.{consumer}", b"", timeout=CHECK_TIMEOUT
            )
            info = json.loads(reply.data)
        except Exception as exc:
            problems.append(f"nats: JetStream did not answer ({type(exc).__name__})")
            continue
        if "error" in info:
            problems.append(f"nats: consumer {consumer} on {stream} missing")
    return problems


class ServiceHealth:
    """The health of one service in this process; see the module docstring."""

    def __init__(self, name: str, check: Check) -> None:
        self.name = name
        self._check = check
        # The health services on this service's own gRPC servers, and the names each serves.
        self._own: list[tuple[Any, tuple[str, ...]]] = []
        self._ops: _OpsServers | None = None
        self._poller: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None
        self.stopping = False
        self.ready = False

    def add_to(self, server: grpc.aio.Server, grpc_service: str) -> None:
        """Serve grpc.health.v1 on the service's own gRPC server (call before it starts):
        "" and `grpc_service` (e.g. "sluice.v1.IngestService") follow this service's
        readiness."""
        servicer = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        self._own.append((servicer, ("", grpc_service, grpc_service_name(self.name))))

    async def start(self, cfg: TelemetryConfig, stop: asyncio.Event) -> None:
        """Join the process's ops servers and keep the gRPC status up to date until `stop`."""
        self._stop = stop
        await self._set(False)  # NOT_SERVING until the first check passes
        self._ops = await _OpsServers.join(cfg, self)
        self._poller = asyncio.create_task(self._poll(stop), name=f"{self.name}-health")

    async def close(self) -> None:
        """Leave the ops servers (the last service to leave stops them)."""
        self.stopping = True
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        await self._set(False)
        if self._ops is not None:
            await self._ops.leave(self)
            self._ops = None

    async def problems(self) -> list[str]:
        """Run the check now; what is missing (empty: ready). Updates the gRPC status."""
        if self._stop is not None and self._stop.is_set():
            self.stopping = True
        if self.stopping:
            await self._set(False)
            return ["shutting down"]
        try:
            problems = list(await asyncio.wait_for(self._check(), CHECK_TIMEOUT * 2))
        except TimeoutError:
            problems = ["readiness check timed out"]
        except Exception as exc:
            log.warning("%s: readiness check failed: %r", self.name, exc)
            problems = [f"readiness check failed: {exc!r}"]
        if not self.stopping:
            await self._set(not problems)
        return problems if not self.stopping else ["shutting down"]

    async def _poll(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.problems()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL_INTERVAL)
        # Told to stop: not ready from now on, while the service drains.
        self.stopping = True
        await self._set(False)

    async def _set(self, ready: bool) -> None:
        if ready != self.ready:
            log.info("%s: %s", self.name, "ready" if ready else "not ready")
        self.ready = ready
        status = SERVING if ready else NOT_SERVING
        for servicer, services in self._own:
            for service in services:
                await servicer.set(service, status)
        if self._ops is not None:
            await self._ops.update()


class _OpsServers:
    """One process's ops HTTP server and gRPC health server, shared by its services."""

    _shared: ClassVar[dict[tuple[asyncio.AbstractEventLoop, str, str], _OpsServers]] = {}

    def __init__(self, http_listen: str, grpc_listen: str) -> None:
        self.http_listen = http_listen
        self.grpc_listen = grpc_listen
        self.services: list[ServiceHealth] = []
        self.servicer: Any = HealthServicer()
        self._runner: web.AppRunner | None = None
        self._grpc: grpc.aio.Server | None = None
        self._started: asyncio.Task[None] | None = None

    @classmethod
    async def join(cls, cfg: TelemetryConfig, service: ServiceHealth) -> _OpsServers | None:
        if not cfg.ops_listen and not cfg.health_grpc_listen:
            return None
        key = (asyncio.get_running_loop(), cfg.ops_listen, cfg.health_grpc_listen)
        ops = cls._shared.get(key)
        if ops is None:
            ops = cls._shared[key] = cls(cfg.ops_listen, cfg.health_grpc_listen)
            ops._started = asyncio.create_task(ops._start())
        ops.services.append(service)
        assert ops._started is not None
        try:
            # Several services may join at once; they all wait for the one start.
            await asyncio.shield(ops._started)
        except BaseException:
            await ops.leave(service)
            raise
        await ops.update()
        return ops

    async def leave(self, service: ServiceHealth) -> None:
        if service in self.services:
            self.services.remove(service)
        await self.servicer.set(grpc_service_name(service.name), NOT_SERVING)
        await self.update()
        if self.services:
            return
        for key, ops in list(self._shared.items()):
            if ops is self:
                del self._shared[key]
        await self._stop()

    async def update(self) -> None:
        """Bring the gRPC status up to date: each service by name, and "" for all of them."""
        for s in self.services:
            await self.servicer.set(grpc_service_name(s.name), SERVING if s.ready else NOT_SERVING)
        ready = bool(self.services) and all(s.ready for s in self.services)
        await self.servicer.set("", SERVING if ready else NOT_SERVING)

    async def _start(self) -> None:
        await self.servicer.set("", NOT_SERVING)
        try:
            if self.grpc_listen:
                self._grpc = grpc.aio.server()
                health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self._grpc)
                self._grpc.add_insecure_port(self.grpc_listen)
                await self._grpc.start()
            if self.http_listen:
                self._runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=1.0)
                await self._runner.setup()
                host, _, port = self.http_listen.rpartition(":")
                await web.TCPSite(self._runner, host or "0.0.0.0", int(port)).start()
        except BaseException:
            await self._stop()
            raise
        log.info(
            "ops: http %s, grpc health %s",
            self.http_listen or "off",
            self.grpc_listen or "off",
        )

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._grpc is not None:
            await self._grpc.stop(grace=None)
            self._grpc = None

    def _app(self) -> web.Application:
        app = web.Application()

        async def healthz(_: web.Request) -> web.Response:
            # Answering at all is the point: the event loop is alive.
            return web.json_response({"status": "ok", "services": [s.name for s in self.services]})

        async def readyz(_: web.Request) -> web.Response:
            services = list(self.services)
            found = await asyncio.gather(*(s.problems() for s in services))
            missing = {s.name: p for s, p in zip(services, found, strict=True) if p}
            ready = bool(services) and not missing
            body: dict[str, Any] = {
                "status": "ready" if ready else "not ready",
                "services": [s.name for s in services],
            }
            if missing:
                body["missing"] = missing
            return web.json_response(body, status=200 if ready else 503)

        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/metrics", make_aiohttp_handler(REGISTRY))
        return app
