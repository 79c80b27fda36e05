"""The tenant and key commands against a real nats-server."""

from __future__ import annotations

import os
import subprocess
import sys

from sluice.natsserver import NatsServer


def _sluice(nats: NatsServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SLUICE_NATS__URL=nats.url)
    return subprocess.run(
        [sys.executable, "-m", "sluice.cli", "--log-level", "WARNING", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


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
