"""`sluice dev`: the whole stack on one machine with embedded defaults.

Starts nats-server (JetStream, data under ./var/dev), a catch-all SMTP sink storing .eml files,
a DNS server that points every domain at the sink, a webhook receiver that logs events, and
all five services; creates a demo tenant and key and prints a curl to try.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shlex
import socket
from pathlib import Path

from aiohttp import web

from sluice import config as config_mod
from sluice.config import Config
from sluice.devdns import DnsServer
from sluice.devsmtp import start_sink
from sluice.nats_layout import connect, ensure_layout
from sluice.natsserver import NatsServer, embedded_gomaxprocs, free_port, port_open
from sluice.services import SERVICES, service
from sluice.tenants import TenantStore, new_webhook_secret, now_ts
from sluice.v1 import tenant_pb2

__all__ = ["run_dev"]

log = logging.getLogger("sluice.dev")

DEMO_TENANT = "demo"
DEMO_DOMAIN = "example.com"
SINK_HOST = "mx.sluice.test"


def _port(preferred: int) -> int:
    return preferred if not port_open("127.0.0.1", preferred) else free_port()


async def _until_listening(addresses: list[str], tasks: list[asyncio.Task[None]]) -> None:
    """Return once every host:port accepts connections or a service task has ended (its
    failure is reported after the banner)."""
    for address in addresses:
        host, _, port = address.rpartition(":")
        while not port_open(host, int(port)):
            if any(t.done() for t in tasks):
                return
            await asyncio.sleep(0.05)


async def _webhook_receiver(path: Path, port: int) -> web.AppRunner:
    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        with path.open("ab") as f:
            f.write(body + b"\n")
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/webhooks", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def run_dev(base: Config, data_dir: Path, stop: asyncio.Event) -> None:
    nats_port = _port(4222)
    smtp_port = _port(2525)
    dns_port = free_port(kind=2)  # SOCK_DGRAM
    hook_port = _port(8025)
    http_port = _port(8080)
    nats_srv = NatsServer(
        data_dir / "jetstream",
        nats_port,
        log_file=data_dir / "nats.log",
        gomaxprocs=embedded_gomaxprocs(),
    )
    nats_srv.start()
    dns_srv = DnsServer(records={SINK_HOST: [("A", "127.0.0.1")]}, catch_all_mx=SINK_HOST)
    await dns_srv.start(port=dns_port)
    sink = await start_sink(data_dir / "mail", "127.0.0.1", smtp_port)
    hooks = await _webhook_receiver(data_dir / "webhooks.jsonl", hook_port)
    cfg = config_mod.replace(
        base,
        nats={"url": nats_srv.url},
        ingest={
            "http_listen": f"127.0.0.1:{http_port}",
            "grpc_listen": f"127.0.0.1:{_port(50051)}",
        },
        scheduler={"listen": f"127.0.0.1:{_port(50061)}"},
        dns={"nameservers": ["127.0.0.1"], "port": dns_port},
        deliverer={"smtp_port": smtp_port, "ehlo_name": "dev.sluice.test"},
        webhooks={"allow_private_targets": True},
    )
    cfg = config_mod.replace(cfg, deliverer={"scheduler": cfg.scheduler.listen})
    # Health and metrics for the whole dev process (docs/health.md), unless configured.
    cfg = config_mod.replace(
        cfg,
        telemetry={
            "ops_listen": cfg.telemetry.ops_listen or f"127.0.0.1:{_port(9090)}",
            "health_grpc_listen": cfg.telemetry.health_grpc_listen or f"127.0.0.1:{_port(50071)}",
        },
    )
    api_key = await _demo_tenant(cfg, f"http://127.0.0.1:{hook_port}/webhooks")
    tasks = [asyncio.create_task(service(name)(cfg, stop), name=name) for name in SERVICES]
    # The banner's curl must work as soon as it is printed: wait for the API's listeners
    # (a fixed half second was too short on a busy machine: the test of this command's curl
    # was refused once, under CI beside other work).
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(60.0):
            await _until_listening([cfg.ingest.http_listen, cfg.ingest.grpc_listen], tasks)
    body = json.dumps(
        {
            "from": {"email": f"hello@{DEMO_DOMAIN}", "name": "Sluice demo"},
            "to": [{"email": "someone@example.net"}],
            "subject": "Hello from Sluice",
            "text": "It works.",
            "tier": "transactional",
        }
    )
    print(
        "\nSluice is running.\n"
        f"  HTTP API  http://{cfg.ingest.http_listen}   gRPC {cfg.ingest.grpc_listen}\n"
        f"  NATS      {nats_srv.url} (data in {data_dir / 'jetstream'})\n"
        f"  Mail sink 127.0.0.1:{smtp_port} -> {data_dir / 'mail'}/*.eml "
        "(every domain resolves to it)\n"
        f"  Webhooks  -> {data_dir / 'webhooks.jsonl'}\n"
        f"  Health    http://{cfg.telemetry.ops_listen}/readyz  /healthz  /metrics   "
        f"gRPC health {cfg.telemetry.health_grpc_listen}\n"
        f"  API key   {api_key}   (tenant {DEMO_TENANT!r}, may send From @{DEMO_DOMAIN})\n\n"
        "Try:\n"
        f"  export SLUICE_API_KEY={api_key}\n"
        f"  curl -sS -X POST http://{cfg.ingest.http_listen}/v1/send \\\n"
        f"    -H 'Authorization: Bearer {api_key}' -H 'Content-Type: application/json' \\\n"
        f"    -d {shlex.quote(body)}\n\n"
        "Ctrl-C stops everything.\n",
        flush=True,
    )
    try:
        done, _ = await asyncio.wait(
            [*tasks, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED
        )
        for t in done:
            if t.get_name() in SERVICES and t.exception() is not None:
                log.error("service %s failed: %r", t.get_name(), t.exception())
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 15)
        await hooks.cleanup()
        sink.close()
        dns_srv.close()
        nats_srv.stop()
        print("Sluice stopped.", flush=True)


async def run_sink(
    smtp_listen: str,
    dns_listen: str,
    mail_dir: Path,
    mx_address: str | None,
    stop: asyncio.Event,
) -> None:
    """`sluice sink`: the dev sink and DNS on their own, for the compose stack."""
    address = mx_address or socket.gethostbyname(socket.gethostname())
    dns_host, _, dns_port = dns_listen.rpartition(":")
    smtp_host, _, smtp_port = smtp_listen.rpartition(":")
    dns_srv = DnsServer(records={SINK_HOST: [("A", address)]}, catch_all_mx=SINK_HOST)
    await dns_srv.start(dns_host, int(dns_port))
    sink = await start_sink(mail_dir, smtp_host, int(smtp_port))
    print(
        f"sink: SMTP {smtp_listen} -> {mail_dir}; DNS {dns_listen}: every domain -> "
        f"{SINK_HOST} ({address})",
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        sink.close()
        dns_srv.close()


async def _demo_tenant(cfg: Config, webhook_url: str) -> str:
    nc = await connect(cfg, "sluice-dev")
    try:
        js = nc.jetstream()
        await ensure_layout(js, cfg)
        store = TenantStore(js)
        tenant = await store.get_tenant(DEMO_TENANT) or tenant_pb2.Tenant(
            tenant_id=DEMO_TENANT,
            name="Demo",
            allowed_from_domains=[DEMO_DOMAIN],
            created_at=now_ts(),
        )
        del tenant.webhooks[:]
        tenant.webhooks.append(
            tenant_pb2.WebhookEndpoint(id="dev", url=webhook_url, secrets=[new_webhook_secret()])
        )
        await store.put_tenant(tenant)
        api_key, _ = await store.create_key(DEMO_TENANT)
        return api_key
    finally:
        await nc.close()
