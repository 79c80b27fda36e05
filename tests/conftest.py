"""Fixtures that start real servers on free ports and clean up after each test."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from scheduler.service import Scheduler
from scheduler.shaping import load_rules
from sluice import config as config_mod
from sluice.config import Config
from sluice.devdns import DnsServer
from sluice.nats_layout import connect, ensure_layout
from sluice.natsserver import NatsServer, free_ports
from sluice.resolver import Resolver
from sluice.services import service
from sluice.tenants import TenantStore, new_webhook_secret, now_ts
from sluice.v1 import tenant_pb2
from tests.servers import ScriptedSmtp, WebhookReceiver, start_smtp

SMTP_HOST = "mx.mail.test"
DOMAINS = ("mail.test", "other.test")


async def wait_for(
    predicate: Callable[[], Any] | Callable[[], Awaitable[Any]],
    timeout: float = 20.0,
    what: str = "condition",
) -> Any:
    """Poll predicate until it returns something truthy; fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    srv = NatsServer(tmp_path / "js", log_file=tmp_path / "nats.log")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
async def dns_server() -> AsyncIterator[DnsServer]:
    records: dict[str, list[tuple[str, str]]] = {SMTP_HOST: [("A", "127.0.0.1")]}
    for d in DOMAINS:
        records[d] = [("MX", f"10 {SMTP_HOST}.")]
    srv = DnsServer(records)
    await srv.start()
    yield srv
    srv.close()


def one_site(dns_server: DnsServer, domains: Iterable[str], mx_host: str) -> None:
    """Point `domains` at one MX host (one site) on 127.0.0.1."""
    for domain in domains:
        dns_server.records[domain] = [("MX", f"10 {mx_host}.")]
    dns_server.records[mx_host] = [("A", "127.0.0.1")]


@pytest.fixture
async def smtp() -> AsyncIterator[tuple[ScriptedSmtp, int]]:
    handler = ScriptedSmtp()
    server, port = await start_smtp(handler)
    yield handler, port
    server.close()


@pytest.fixture
async def webhook_receiver() -> AsyncIterator[WebhookReceiver]:
    receiver = WebhookReceiver(secret=new_webhook_secret())
    await receiver.start()
    yield receiver
    await receiver.stop()


def scheduler_config(
    nats_server: NatsServer, dns_port: int | None = None, **sections: dict[str, Any]
) -> Config:
    """A configuration for a Scheduler under test: the test nats-server, the test DNS server
    on `dns_port` if given, and `sections` (e.g. scheduler={"lease_ttl": "30s"})."""
    dns = {"nameservers": ["127.0.0.1"], "port": dns_port} if dns_port is not None else {}
    return config_mod.replace(
        Config(),
        nats={"url": nats_server.url},
        **{**sections, "dns": {**dns, **sections.get("dns", {})}},
    )


@contextlib.asynccontextmanager
async def running_scheduler(
    cfg: Config,
    *,
    shaping: Path | None = None,
    resolver: Resolver | None = None,
    start: bool = True,
) -> AsyncIterator[Scheduler]:
    """A Scheduler on Sluice's JetStream layout, with the rules of `shaping` (a TOML file;
    the shipped defaults if None) and `resolver` (a real one for cfg.dns if None); started
    (its KV state loaded) unless `start` is False. Its JetStream is `scheduler._js`."""
    if shaping is not None:
        cfg = config_mod.replace(cfg, scheduler={"shaping": str(shaping)})
    nc = await connect(cfg, "test")
    try:
        js = nc.jetstream()
        await ensure_layout(js, cfg)
        scheduler = Scheduler(cfg, js, load_rules(shaping), resolver or Resolver(cfg.dns))
        if start:
            await scheduler.start()
        yield scheduler
    finally:
        await nc.close()


def make_config(
    nats_url: str, dns_port: int, smtp_port: int, overrides: dict[str, dict[str, Any]] | None = None
) -> Config:
    sched_port, http_port, grpc_port = free_ports(3)
    sched = f"127.0.0.1:{sched_port}"
    cfg = config_mod.replace(
        Config(),
        nats={"url": nats_url, "connect_timeout": "2s"},
        ingest={
            "http_listen": f"127.0.0.1:{http_port}",
            "grpc_listen": f"127.0.0.1:{grpc_port}",
            "publish_timeout": "2s",
        },
        scheduler={"listen": sched, "backlog_interval": "0.2s", "lease_ttl": "5s"},
        deliverer={
            "scheduler": sched,
            "smtp_port": smtp_port,
            "ehlo_name": "deliverer.test",
            "idle_poll": "0.1s",
            "command_timeout": "10s",
            "connect_timeout": "5s",
        },
        dns={"nameservers": ["127.0.0.1"], "port": dns_port, "timeout": "2s"},
        retry={"ladder": ["1s", "2s"], "jitter": 0.0},
        webhooks={"allow_private_targets": True, "ladder": ["1s"], "timeout": "5s"},
    )
    return config_mod.replace(cfg, **(overrides or {}))


@dataclass
class Stack:
    cfg: Config
    api_key: str
    tenant_id: str
    smtp: ScriptedSmtp
    hooks: WebhookReceiver
    nats: NatsServer
    stop: asyncio.Event
    tasks: list[asyncio.Task[None]]

    @property
    def http(self) -> str:
        return f"http://{self.cfg.ingest.http_listen}"


@pytest.fixture
def stack_overrides() -> dict[str, dict[str, Any]]:
    """Config overrides for the `stack` fixture; a test module may redefine this."""
    return {}


@pytest.fixture
def stack_services() -> tuple[str, ...]:
    """Which services the `stack` fixture runs; a test module may redefine this."""
    return ("ingest", "expander", "scheduler", "deliverer", "webhooks")


@pytest.fixture
async def stack(
    nats_server: NatsServer,
    dns_server: DnsServer,
    smtp: tuple[ScriptedSmtp, int],
    webhook_receiver: WebhookReceiver,
    stack_overrides: dict[str, dict[str, Any]],
    stack_services: tuple[str, ...],
) -> AsyncIterator[Stack]:
    handler, smtp_port = smtp
    cfg = make_config(nats_server.url, dns_server.port, smtp_port, stack_overrides)
    nc = await connect(cfg, "test-setup")
    js = nc.jetstream()
    await ensure_layout(js, cfg)
    tenants = TenantStore(js)
    await tenants.put_tenant(
        tenant_pb2.Tenant(
            tenant_id="acme",
            name="Acme",
            allowed_from_domains=["acme.test"],
            created_at=now_ts(),
            webhooks=[
                tenant_pb2.WebhookEndpoint(
                    id="ep1",
                    url=f"http://127.0.0.1:{webhook_receiver.port}/hook",
                    secrets=[webhook_receiver.secret],
                )
            ],
        )
    )
    api_key, _ = await tenants.create_key("acme")
    await nc.close()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(service(n)(cfg, stop), name=n) for n in stack_services]
    st = Stack(cfg, api_key, "acme", handler, webhook_receiver, nats_server, stop, tasks)
    if "ingest" in stack_services:
        await wait_for(lambda: _listening(cfg.ingest.http_listen), 10, "ingest to listen")
    # Tests stop and restart the scheduler; a service cancelled half-way through start-up
    # (inside nats-py's connect) may never finish, so only hand over a started one.
    if "scheduler" in stack_services:
        await wait_for(lambda: _listening(cfg.scheduler.listen), 10, "scheduler to listen")
    yield st
    stop.set()
    done, pending = await asyncio.wait(tasks, timeout=15)
    for t in pending:
        t.cancel()
    # Let cancelled services run their clean-up (closing NATS connections) before the loop
    # closes, or their sockets surface later as unclosed-resource warnings.
    await asyncio.gather(*pending, return_exceptions=True)
    for t in done:
        if not t.cancelled() and t.exception() is not None and nats_server.proc is not None:
            raise t.exception()  # type: ignore[misc]


async def _listening(hostport: str) -> bool:
    host, _, port = hostport.rpartition(":")
    try:
        _, writer = await asyncio.open_connection(host, int(port))
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True
