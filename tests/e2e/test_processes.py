"""Each service runs alone as its own process, configured by a sluice.toml plus SLUICE_*
variables, and together they deliver; SIGTERM stops each one cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp

from sluice.devdns import DnsServer
from sluice.nats_layout import connect, ensure_layout
from sluice.natsserver import NatsServer, free_port
from sluice.tenants import TenantStore, now_ts
from sluice.v1 import tenant_pb2
from tests.conftest import wait_for
from tests.servers import ScriptedSmtp

SERVICES = ("ingest", "expander", "scheduler", "deliverer", "webhooks")


async def test_five_processes_from_config_file_and_environment(
    tmp_path: Path,
    nats_server: NatsServer,
    dns_server: DnsServer,
    smtp: tuple[ScriptedSmtp, int],
) -> None:
    handler, smtp_port = smtp
    http, sched = free_port(), free_port()
    config = tmp_path / "sluice.toml"
    config.write_text(
        f'[nats]\nurl = "{nats_server.url}"\n'
        f'[ingest]\nhttp_listen = "127.0.0.1:{http}"\ngrpc_listen = "127.0.0.1:{free_port()}"\n'
        f'[scheduler]\nlisten = "127.0.0.1:{sched}"\nbacklog_interval = "200ms"\n'
        f'[dns]\nnameservers = ["127.0.0.1"]\nport = {dns_server.port}\n'
    )
    env = dict(
        os.environ,
        SLUICE_CONFIG=str(config),
        # Settings from the environment override the file.
        SLUICE_DELIVERER__SCHEDULER=f"127.0.0.1:{sched}",
        SLUICE_DELIVERER__SMTP_PORT=str(smtp_port),
        SLUICE_DELIVERER__IDLE_POLL="100ms",
        SLUICE_DELIVERER__EHLO_NAME="proc.test",
    )
    from sluice import config as config_mod

    cfg = config_mod.load(config, environ={})
    nc = await connect(cfg, "test")
    await ensure_layout(nc.jetstream(), cfg)
    tenants = TenantStore(nc.jetstream())
    await tenants.put_tenant(
        tenant_pb2.Tenant(tenant_id="solo", allowed_from_domains=["acme.test"], created_at=now_ts())
    )
    key, _ = await tenants.create_key("solo")
    await nc.close()

    procs = {
        name: await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sluice.cli",
            name,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        for name in SERVICES
    }
    try:

        async def accepted() -> bool:
            try:
                async with (
                    aiohttp.ClientSession() as s,
                    s.post(
                        f"http://127.0.0.1:{http}/v1/send",
                        headers={"Authorization": f"Bearer {key}"},
                        json={
                            "from": {"email": "a@acme.test"},
                            "to": [{"email": "bob@mail.test"}],
                            "subject": "from five processes",
                            "text": "hi",
                        },
                    ) as resp,
                ):
                    return resp.status == 202
            except aiohttp.ClientConnectionError:
                return False  # ingest not listening yet

        await wait_for(accepted, 30, "ingest to accept")
        received = await wait_for(lambda: handler.to("bob@mail.test"), 30, "delivery")
        assert received[0].message["Subject"] == "from five processes"
        assert handler.ehlo_names[-1] == "proc.test"
    finally:
        for proc in procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        codes = {}
        for name, proc in procs.items():
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
            codes[name] = proc.returncode
    errors = {n: (await p.stderr.read()).decode()[-2000:] for n, p in procs.items() if p.stderr}
    assert codes == dict.fromkeys(SERVICES, 0), errors
