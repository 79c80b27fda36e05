"""The tenant and key commands against a real nats-server."""

from __future__ import annotations

import subprocess

from sluice.natsserver import NatsServer
from tests.api import sluice_cli


def _sluice(nats: NatsServer, *args: str) -> subprocess.CompletedProcess[str]:
    return sluice_cli(nats.url, *args)


def test_tenants_and_keys(nats_server: NatsServer) -> None:
    made = _sluice(
        nats_server,
        "tenants",
        "create",
        "acme",
        "--from-domain",
        "Acme.Example",
        "--webhook",
        "https://hooks.acme.example/x",
    )
    assert made.returncode == 0, made.stderr
    assert '"allowed_from_domains": [\n    "acme.example"' in made.stdout
    assert "whsec_" in made.stdout
    key = _sluice(nats_server, "keys", "create", "--tenant", "acme", "--tiers", "critical")
    assert key.returncode == 0 and key.stdout.startswith("sk_")
    assert "shown only once" in key.stderr
    listed = _sluice(nats_server, "keys", "list").stdout.split()
    key_id = key.stdout.split("_")[1]
    assert listed == [key_id, "acme", "active"]
    assert _sluice(nats_server, "keys", "revoke", key_id).returncode == 0
    assert _sluice(nats_server, "keys", "list").stdout.split()[2] == "revoked"
    missing = _sluice(nats_server, "keys", "create", "--tenant", "nobody")
    assert missing.returncode == 1 and "no tenant" in missing.stderr
    bad = _sluice(nats_server, "tenants", "create", "Bad_Id", "--from-domain", "x.example")
    assert bad.returncode == 2


async def test_dlq_commands(nats_server: NatsServer) -> None:
    import asyncio

    from sluice import config as config_mod
    from sluice import names
    from sluice.nats_layout import connect, ensure_layout
    from sluice.tenants import now_ts
    from sluice.v1 import messages_pb2

    cfg = config_mod.replace(config_mod.Config(), nats={"url": nats_server.url})
    nc = await connect(cfg, "test")
    js = nc.jetstream()
    await ensure_layout(js, cfg)
    pointer = messages_pb2.DeliveryPointer(
        delivery_id="job_x-0",
        job_id="job_x",
        tenant_id="acme",
        recipient="bob@mail.test",
        domain="mail.test",
        tier=messages_pb2.TIER_BULK,
        accepted_at=now_ts(),
    )
    dead = messages_pb2.DeadLetter(pointer=pointer, reason=messages_pb2.DEAD_LETTER_REASON_BOUNCED)
    await js.publish(names.dlq_subject("acme", "job_x-0"), dead.SerializeToString())

    listed = await asyncio.to_thread(_sluice, nats_server, "dlq", "list")
    assert listed.stdout.split("\t")[:4] == [
        "job_x-0",
        "acme",
        "bob@mail.test",
        "DEAD_LETTER_REASON_BOUNCED",
    ]
    shown = await asyncio.to_thread(
        _sluice, nats_server, "dlq", "show", "job_x-0", "--tenant", "acme"
    )
    assert '"recipient": "bob@mail.test"' in shown.stdout
    replayed = await asyncio.to_thread(
        _sluice, nats_server, "dlq", "replay", "job_x-0", "--tenant", "acme"
    )
    assert replayed.returncode == 0, replayed.stderr
    info = await js.stream_info(names.MAIL_STREAM)
    assert info.state.messages == 1
    assert (await asyncio.to_thread(_sluice, nats_server, "dlq", "list")).stdout == ""
    await nc.close()
