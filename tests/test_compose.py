"""compose.yaml is validated (no Docker engine here): every service runs a real `sluice`
command with valid SLUICE_* settings, the image builds from files that exist, and the NATS
cluster flags really form a 3-node JetStream cluster that takes Sluice's R3 layout."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from sluice import config as config_mod
from sluice.cli import _parser
from sluice.nats_layout import connect, ensure_layout
from sluice.natsserver import NatsServer, free_port
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def test_services_run_real_commands_with_valid_settings(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("ingest", "expander", "scheduler", "deliverer", "webhooks", "sink"):
        svc = services[name]
        assert "entrypoint" not in svc, name
        _parser().parse_args(svc["command"])  # exits on an unknown command or flag
        env = {k: str(v) for k, v in svc["environment"].items()}
        cfg = config_mod.load(None, environ=env)
        assert cfg.nats.replicas == 3
        assert cfg.nats.url.count("nats://") == 3
    assert services["deliverer"]["deploy"]["replicas"] >= 2
    assert services["ingest"]["deploy"]["replicas"] >= 2
    sink_ip = services["sink"]["networks"]["sluice"]["ipv4_address"]
    assert services["deliverer"]["environment"]["SLUICE_DNS__NAMESERVERS"] == sink_ip


def test_image_builds_from_existing_files() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (\S+(?: \S+)*) \S+$", dockerfile, re.MULTILINE):
        for path in src.split():
            assert (ROOT / path).exists(), f"Dockerfile copies missing {path}"
    assert 'ENTRYPOINT ["sluice"]' in dockerfile


async def test_nats_cluster_flags_form_a_cluster_that_takes_r3_streams(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    nodes = ["nats1", "nats2", "nats3"]
    cluster_ports = {n: free_port() for n in nodes}
    servers = []
    try:
        for n in nodes:
            args = list(compose["services"][n]["command"])
            # Same flags as compose, with loopback addresses and one port per node.
            args = [a.replace("0.0.0.0:6222", f"127.0.0.1:{cluster_ports[n]}") for a in args]
            routes = args.index("--routes") + 1
            for other, port in cluster_ports.items():
                args[routes] = args[routes].replace(f"{other}:6222", f"127.0.0.1:{port}")
            sd = args.index("-sd") + 1
            args[sd] = str(tmp_path / n)
            srv = NatsServer(tmp_path / n, extra_args=args, log_file=tmp_path / f"{n}.log")
            srv.start()
            servers.append(srv)
        env = {k: str(v) for k, v in compose["services"]["expander"]["environment"].items()}
        env["SLUICE_NATS__URL"] = ",".join(s.url for s in servers)
        cfg = config_mod.load(None, environ=env)

        async def layout_created() -> bool:
            nc = await connect(cfg, "compose-test")
            try:
                await ensure_layout(nc.jetstream(), cfg)
                info = await nc.jetstream().stream_info("MAIL")
                cluster = info.cluster
                return (
                    info.config.num_replicas == 3
                    and cluster is not None
                    and len(cluster.replicas or []) == 2
                )
            except Exception:
                return False
            finally:
                await nc.close()

        await wait_for(layout_created, 60, "R3 streams on the 3-node cluster")
    finally:
        for srv in servers:
            srv.stop()
