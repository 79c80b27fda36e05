"""TLS and mutual TLS on the scheduler's gRPC port (docs/security.md), with a real scheduler
on a real nats-server and SchedulerClient (the deliverer's and `sluice sites`' client).
Delivery end to end over mutual TLS: tests/sluice/test_nats_security.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from deliverer.schedclient import SchedulerClient
from sluice import config as config_mod
from sluice.config import Config, ConfigError
from sluice.natsserver import NatsServer, free_port
from sluice.services import service
from sluice.v1 import scheduler_pb2
from tests.certs import Ca, Issued
from tests.conftest import _listening, wait_for

StartScheduler = Callable[..., Awaitable[Config]]


@pytest.fixture
def pki(tmp_path: Path) -> tuple[Ca, Issued]:
    ca = Ca(tmp_path / "pki")
    return ca, ca.issue("scheduler")


@pytest.fixture
async def start_scheduler(nats_server: NatsServer) -> AsyncIterator[StartScheduler]:
    """Runs a scheduler with the given [scheduler] keys; returns its config."""
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    async def start(**scheduler: Any) -> Config:
        listen = f"127.0.0.1:{free_port()}"
        cfg = config_mod.replace(
            Config(),
            nats={"url": nats_server.url},
            scheduler={"listen": listen, **scheduler},
            deliverer={"scheduler": listen},
        )
        tasks.append(asyncio.create_task(service("scheduler")(cfg, stop)))
        await wait_for(lambda: _listening(listen), 10, "scheduler to listen")
        return cfg

    yield start
    stop.set()
    await asyncio.gather(*tasks)


def _deliverer(cfg: Config, **deliverer: Any) -> SchedulerClient:
    return SchedulerClient.from_config(config_mod.replace(cfg, deliverer=deliverer).deliverer)


async def _list_sites(client: SchedulerClient) -> scheduler_pb2.ListSitesResponse:
    async with client:
        return await client.ListSites(scheduler_pb2.ListSitesRequest(), timeout=20)


async def _fails(client: SchedulerClient) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _list_sites(client)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    return str(err.value.details())


async def test_tls_needs_the_ca(start_scheduler: StartScheduler, pki: tuple[Ca, Issued]) -> None:
    ca, cert = pki
    cfg = await start_scheduler(tls_cert_file=str(cert.cert), tls_key_file=str(cert.key))
    resp = await _list_sites(_deliverer(cfg, scheduler_tls_ca_file=str(ca.pem)))
    assert isinstance(resp, scheduler_pb2.ListSitesResponse)

    # TLS against the system's CAs, which did not sign the scheduler's certificate.
    address = cfg.scheduler.listen
    details = await _fails(SchedulerClient(address, grpc.ssl_channel_credentials()))
    assert "CERTIFICATE_VERIFY_FAILED" in details
    # Plaintext to a TLS port.
    await _fails(SchedulerClient(address))
    # The certificate names 127.0.0.1 and localhost, not this name.
    wrong = _deliverer(cfg, scheduler_tls_ca_file=str(ca.pem), scheduler_tls_server_name="x.test")
    assert "hostname verification" in (await _fails(wrong)).lower()


async def test_server_name_override(
    start_scheduler: StartScheduler, pki: tuple[Ca, Issued]
) -> None:
    ca, _ = pki
    # A certificate for a DNS name only, reached by IP address.
    named = ca.issue("named", ips=(), dns=("scheduler.internal",))
    cfg = await start_scheduler(tls_cert_file=str(named.cert), tls_key_file=str(named.key))
    by_name = _deliverer(
        cfg, scheduler_tls_ca_file=str(ca.pem), scheduler_tls_server_name="scheduler.internal"
    )
    assert isinstance(await _list_sites(by_name), scheduler_pb2.ListSitesResponse)
    refused = await _fails(_deliverer(cfg, scheduler_tls_ca_file=str(ca.pem)))
    assert "hostname verification" in refused.lower()


async def test_mutual_tls(start_scheduler: StartScheduler, pki: tuple[Ca, Issued]) -> None:
    ca, cert = pki
    cfg = await start_scheduler(
        tls_cert_file=str(cert.cert), tls_key_file=str(cert.key), tls_client_ca_file=str(ca.pem)
    )
    client = ca.issue("deliverer", server=False, ips=(), dns=())
    with_cert = _deliverer(
        cfg,
        scheduler_tls_ca_file=str(ca.pem),
        scheduler_tls_cert_file=str(client.cert),
        scheduler_tls_key_file=str(client.key),
    )
    assert isinstance(await _list_sites(with_cert), scheduler_pb2.ListSitesResponse)

    # No client certificate: refused.
    await _fails(_deliverer(cfg, scheduler_tls_ca_file=str(ca.pem)))
    # A client certificate from another CA: refused.
    stranger = Ca(ca.folder.parent / "stranger").issue("x", server=False, ips=(), dns=())
    await _fails(
        _deliverer(
            cfg,
            scheduler_tls_ca_file=str(ca.pem),
            scheduler_tls_cert_file=str(stranger.cert),
            scheduler_tls_key_file=str(stranger.key),
        )
    )
    # The server closed those handshakes (the details say only "Socket closed"), and it is
    # still there for a client with a certificate.
    with_cert = _deliverer(
        cfg,
        scheduler_tls_ca_file=str(ca.pem),
        scheduler_tls_cert_file=str(client.cert),
        scheduler_tls_key_file=str(client.key),
    )
    assert isinstance(await _list_sites(with_cert), scheduler_pb2.ListSitesResponse)


async def test_config_errors(tmp_path: Path) -> None:
    cfg = config_mod.replace(
        Config(), scheduler={"tls_cert_file": str(tmp_path / "missing.pem"), "tls_key_file": "k"}
    )
    stop = asyncio.Event()
    with pytest.raises(ConfigError, match="cannot read"):
        await service("scheduler")(cfg, stop)
    with pytest.raises(ConfigError, match="needs its key"):
        _deliverer(Config(), scheduler_tls_cert_file=str(tmp_path / "c.pem"))
