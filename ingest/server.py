"""Runs the ingest process: the gRPC server and the HTTP/JSON server over one core."""

from __future__ import annotations

import asyncio
import logging

import grpc
from aiohttp import web

from ingest.auth import Authenticator
from ingest.grpc_api import servicer_handler
from ingest.http_api import make_app
from ingest.service import IngestCore
from sluice.config import Config
from sluice.health import ServiceHealth, nats_problems
from sluice.nats_layout import connect, ensure_layout
from sluice.store import open_store
from sluice.tenants import TenantStore

__all__ = ["serve"]

log = logging.getLogger(__name__)


def split_hostport(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host or "0.0.0.0", int(port)


async def serve(cfg: Config, stop: asyncio.Event) -> None:
    nc = await connect(cfg, "sluice-ingest")
    js = nc.jetstream()
    await ensure_layout(js, cfg)
    store = open_store(cfg.store, js, cfg.nats.replicas)
    core = IngestCore(
        cfg,
        nc,
        js,
        store,
        Authenticator(TenantStore(js), cfg.ingest.key_cache_ttl),
    )
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", cfg.ingest.grpc_max_message_bytes),
            ("grpc.max_send_message_length", cfg.ingest.grpc_max_message_bytes),
        ]
    )
    server.add_generic_rpc_handlers((servicer_handler(core, cfg.ingest),))
    health = ServiceHealth("ingest", lambda: nats_problems(nc))
    health.add_to(server, "sluice.v1.IngestService")
    server.add_insecure_port(cfg.ingest.grpc_listen)
    await server.start()
    runner = web.AppRunner(
        make_app(core, cfg.ingest.max_request_bytes),
        access_log=None,
        shutdown_timeout=cfg.shutdown.drain_timeout,
    )
    await runner.setup()
    host, port = split_hostport(cfg.ingest.http_listen)
    # Several ingest processes may share the ports (SO_REUSEPORT; gRPC does this by default).
    site = web.TCPSite(runner, host, port, reuse_port=True)
    await site.start()
    log.info("ingest: http on %s, grpc on %s", cfg.ingest.http_listen, cfg.ingest.grpc_listen)
    try:
        await health.start(cfg.telemetry, stop)
        await stop.wait()
    finally:
        # Drain both edges at once: no new requests; those in hand end (a 202 once JetStream
        # has the job, or an error) within drain_timeout.
        await asyncio.gather(runner.cleanup(), server.stop(grace=cfg.shutdown.drain_timeout))
        await health.close()
        await store.close()
        await nc.close()
