"""Health on every service (sluice/health.py, docs/health.md): /healthz, /readyz and /metrics
on the ops port, and grpc.health.v1 — followed through a nats-server stop and restart, a
missing stream, the start of a drain, and five services sharing one process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from sluice import config as config_mod
from sluice import names
from sluice.config import Config
from sluice.health import grpc_service_name
from sluice.nats_layout import connect, ensure_layout
from sluice.natsserver import NatsServer, free_ports
from sluice.services import SERVICES, service
from sluice.tenants import TenantStore
from tests.api import blast
from tests.conftest import Stack, make_config, wait_for
from tests.servers import start_hook_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# The gRPC service each API server names in its own health service.
OWN_GRPC = {"ingest": "sluice.v1.IngestService", "scheduler": "sluice.v1.SchedulerService"}


def with_ops(cfg: Config) -> Config:
    http, grpc_port = free_ports(2)
    return config_mod.replace(
        cfg,
        telemetry={
            "ops_listen": f"127.0.0.1:{http}",
            "health_grpc_listen": f"127.0.0.1:{grpc_port}",
        },
        shutdown={"drain_timeout": "20s"},
    )


async def get(cfg: Config, path: str) -> tuple[int, str, str]:
    """Status, content type and body of GET on the ops port."""
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://{cfg.telemetry.ops_listen}{path}") as resp,
    ):
        return resp.status, resp.content_type, await resp.text()


async def get_json(cfg: Config, path: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://{cfg.telemetry.ops_listen}{path}") as resp,
    ):
        return resp.status, await resp.json()


async def grpc_status(target: str, name: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        resp = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=name), timeout=5
        )
    return int(resp.status)


async def statuses(cfg: Config, svc: str) -> set[int]:
    """Every gRPC health status this service shows: on the ops port ("" and its own name)
    and, for ingest and the scheduler, on their API port too."""
    target = cfg.telemetry.health_grpc_listen
    found = {await grpc_status(target, ""), await grpc_status(target, grpc_service_name(svc))}
    if svc in OWN_GRPC:
        own = cfg.ingest.grpc_listen if svc == "ingest" else cfg.scheduler.listen
        for name in ("", OWN_GRPC[svc], grpc_service_name(svc)):
            found.add(await grpc_status(own, name))
    return found


async def ready(cfg: Config) -> bool:
    try:
        status, _ = await get_json(cfg, "/readyz")
    except aiohttp.ClientConnectionError:
        return False  # not listening yet
    return status == 200


@pytest.fixture
async def running(
    request: pytest.FixtureRequest, nats_server: NatsServer
) -> AsyncIterator[tuple[str, Config]]:
    """One service alone in this process, with its ops ports on."""
    svc: str = request.param
    # Nothing listens on the SMTP and DNS ports: health must not depend on them.
    dns_port, smtp_port = free_ports(2)
    cfg = with_ops(make_config(nats_server.url, dns_port, smtp_port))
    stop = asyncio.Event()
    task = asyncio.create_task(service(svc)(cfg, stop))
    try:
        yield svc, cfg
    finally:
        if nats_server.proc is None:
            nats_server.start()  # let the service close its connection cleanly
        stop.set()
        await asyncio.wait_for(task, 30)


@pytest.mark.parametrize("running", SERVICES, indirect=True)
async def test_ready_then_not_ready_without_nats_then_ready_again(
    running: tuple[str, Config], nats_server: NatsServer
) -> None:
    svc, cfg = running
    await wait_for(lambda: ready(cfg), 30, f"{svc} ready")
    status, body = await get_json(cfg, "/readyz")
    assert (status, body) == (200, {"status": "ready", "services": [svc]})
    assert await get_json(cfg, "/healthz") == (200, {"status": "ok", "services": [svc]})
    await wait_for(lambda: _all(statuses(cfg, svc), SERVING), 10, "gRPC SERVING")

    nats_server.stop()

    async def not_ready() -> Any:
        status, body = await get_json(cfg, "/readyz")
        return body if status == 503 else None

    body = await wait_for(not_ready, 30, "readyz 503 without NATS")
    assert body["status"] == "not ready"
    assert body["missing"][svc], body
    assert all(p.startswith("nats: ") for p in body["missing"][svc]), body
    await wait_for(lambda: _all(statuses(cfg, svc), NOT_SERVING), 10, "gRPC NOT_SERVING")
    # Alive all the same: the process answers.
    assert (await get_json(cfg, "/healthz"))[0] == 200

    await asyncio.to_thread(nats_server.start)
    await wait_for(lambda: ready(cfg), 30, f"{svc} ready after the restart")
    await wait_for(lambda: _all(statuses(cfg, svc), SERVING), 10, "gRPC SERVING again")
    if svc == "ingest":
        # The API port's own /healthz still answers.
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"http://{cfg.ingest.http_listen}/healthz") as resp,
        ):
            assert resp.status == 200


async def _all(found: Any, status: int) -> bool:
    return bool(await found == {status})


@pytest.mark.parametrize("running", ["expander"], indirect=True)
async def test_a_missing_stream_is_named_until_it_is_back(running: tuple[str, Config]) -> None:
    svc, cfg = running
    await wait_for(lambda: ready(cfg), 30, "ready")
    nc = await connect(cfg, "test")
    try:
        await nc.jetstream().delete_stream(names.ADVISORIES_STREAM)
        status, body = await get_json(cfg, "/readyz")
        assert status == 503
        assert body["missing"] == {svc: [f"nats: stream {names.ADVISORIES_STREAM} missing"]}
        await ensure_layout(nc.jetstream(), cfg)
        assert await get_json(cfg, "/readyz") == (
            200,
            {"status": "ready", "services": [svc]},
        )
    finally:
        await nc.close()


@pytest.mark.parametrize("running", ["deliverer"], indirect=True)
async def test_metrics_are_prometheus_text(running: tuple[str, Config]) -> None:
    _, cfg = running
    await wait_for(lambda: ready(cfg), 30, "ready")
    status, content_type, text = await get(cfg, "/metrics")
    assert status == 200 and content_type == "text/plain", content_type
    families = {f.name for f in text_string_to_metric_families(text)}
    # prometheus_client's default registry: what anything registered there is served with.
    assert "python_info" in families, sorted(families)


@pytest.fixture
def stack_overrides() -> dict[str, dict[str, Any]]:
    http, grpc_port = free_ports(2)
    return {
        "telemetry": {
            "ops_listen": f"127.0.0.1:{http}",
            "health_grpc_listen": f"127.0.0.1:{grpc_port}",
        }
    }


async def test_five_services_in_one_process_share_the_ops_ports(stack: Stack) -> None:
    cfg = stack.cfg
    await wait_for(lambda: ready(cfg), 30, "all ready")
    status, body = await get_json(cfg, "/readyz")
    assert status == 200 and sorted(body["services"]) == sorted(SERVICES), body
    target = cfg.telemetry.health_grpc_listen
    await wait_for(lambda: _is(grpc_status(target, ""), SERVING), 10, "process SERVING")
    for svc in SERVICES:
        assert await grpc_status(target, grpc_service_name(svc)) == SERVING, svc
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await grpc_status(target, "sluice.nothing")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def _is(found: Any, status: int) -> bool:
    return bool(await found == status)


async def test_not_ready_from_the_start_of_a_drain(stack: Stack) -> None:
    """While a service drains (here: a webhook POST that hangs) it is alive and not ready."""
    cfg = stack.cfg
    await wait_for(lambda: ready(cfg), 30, "all ready")
    release = asyncio.Event()
    hanging: list[bool] = []

    async def hang(request: web.Request) -> web.Response:
        hanging.append(True)
        await release.wait()
        return web.Response(status=204)

    runner, url = await start_hook_server(hang)
    nc = await connect(cfg, "test")
    try:
        tenants = TenantStore(nc.jetstream())
        tenant = await tenants.get_tenant(stack.tenant_id)
        assert tenant is not None
        tenant.webhooks[0].url = url
        await tenants.put_tenant(tenant)
        await blast(stack, ["someone@mail.test"], tier="transactional")
        await wait_for(lambda: hanging, 30, "a webhook POST in hand")
        stack.stop.set()
        status, body = await get_json(cfg, "/readyz")
        assert status == 503, body
        assert body["missing"]["webhooks"] == ["shutting down"], body
        assert all(p == ["shutting down"] for p in body["missing"].values()), body
        assert (await get_json(cfg, "/healthz"))[0] == 200
        assert await grpc_status(cfg.telemetry.health_grpc_listen, "") == NOT_SERVING
    finally:
        release.set()
        await nc.close()
        await runner.cleanup()
