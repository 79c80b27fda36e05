"""compose.yaml is validated (no Docker engine here): every service runs a real `sluice`
command with valid SLUICE_* settings; the S3 store, the collector, the schedulers and the sink
are wired as the file says; every health check asks an endpoint the settings enable, and
passes against a real ready process and fails against one without NATS; the NATS cluster
flags really form a 3-node JetStream cluster that takes Sluice's R3 layout; published ports
do not collide; every file the stack and the image use exists; the S3 settings, the bucket's
lifecycle rule and the user's policy work against a real S3 API (moto's server)."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3  # type: ignore[import-untyped]
import pytest
import yaml
from botocore.exceptions import ClientError  # type: ignore[import-untyped]

from sluice import config as config_mod
from sluice.cli import _parser
from sluice.config import Config
from sluice.nats_layout import connect, ensure_layout
from sluice.natsserver import NatsServer, free_port, free_ports
from sluice.services import SERVICES
from sluice.store import S3ObjectStore
from sluice.telemetry import EXPORTERS
from tests.conftest import Stack, wait_for
from tests.sluice.test_store import S3Server
from tests.sluice.test_store import s3_server as s3_server  # the moto S3 server fixture

ROOT = Path(__file__).resolve().parents[1]
SLUICE_IMAGE = "sluice:local"

# Compose's substitution: $$ is a literal $, ${VAR:-default} / ${VAR-default} a variable with
# a default; ${VAR} and $VAR are variables without one.
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_]\w*)(:?-([^}]*))?\}|\$([A-Za-z_]\w*)")


def interpolate(text: str) -> str:
    """compose.yaml as `docker compose` reads it with none of its variables set: a variable
    without a default would silently be empty (or an unescaped shell `$x`), so it fails."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        if m.group(2) is None:
            raise AssertionError(f"compose.yaml: {m.group(0)} has no default (or write $$)")
        return m.group(3)

    return _VAR.sub(sub, text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(interpolate((ROOT / "compose.yaml").read_text()))
    return data


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = compose["services"]
    return services


def sluice_containers(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services that run the `sluice` CLI (the image's entrypoint)."""
    return {
        name: svc
        for name, svc in _services(compose).items()
        if svc.get("image") == SLUICE_IMAGE and "entrypoint" not in svc
    }


def sluice_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Long-running Sluice services (ingest, expander, scheduler, deliverer, webhooks)."""
    return {
        name: svc
        for name, svc in sluice_containers(compose).items()
        if svc.get("command", [""])[0] in SERVICES
    }


def env_of(svc: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in (svc.get("environment") or {}).items()}


def config_of(svc: dict[str, Any]) -> Config:
    return config_mod.load(None, environ=env_of(svc))


def hostport(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def by_command(compose: dict[str, Any], command: str) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in sluice_services(compose).items() if s["command"][0] == command}


def replicas(svc: dict[str, Any]) -> int:
    return int(svc.get("deploy", {}).get("replicas", 1))


def test_every_command_and_setting_is_real(compose: dict[str, Any]) -> None:
    assert set(SERVICES) <= {s["command"][0] for s in sluice_services(compose).values()}
    for name, svc in sluice_containers(compose).items():
        if name == "tools":  # `docker compose run tools <command>`
            assert "command" not in svc and svc["profiles"] == ["tools"]
        try:
            _parser().parse_args(svc.get("command", ["tenants", "list"]))
        except SystemExit:
            pytest.fail(f"{name}: `sluice {' '.join(svc['command'])}` is not a sluice command")
        cfg = config_of(svc)  # ConfigError on an unknown key or a bad value
        assert cfg.telemetry.exporter in EXPORTERS, name
        assert cfg.nats.replicas == 3, name
        nats_hosts = {urlsplit(u).hostname for u in cfg.nats.url.split(",")}
        assert nats_hosts == {"nats1", "nats2", "nats3"}, name
    # A SLUICE_ variable anywhere else must be a setting too (or a typo would be ignored).
    for name, svc in _services(compose).items():
        env = {k: v for k, v in env_of(svc).items() if k.startswith("SLUICE_")}
        try:
            config_mod.load(None, environ=env)
        except config_mod.ConfigError as exc:
            pytest.fail(f"{name}: {exc}")


def test_roles_and_counts(compose: dict[str, Any]) -> None:
    services = _services(compose)
    assert replicas(services["deliverer"]) == 3
    assert sum(replicas(s) for s in by_command(compose, "deliverer").values()) == 3
    assert sum(replicas(s) for s in by_command(compose, "ingest").values()) >= 2
    assert sum(replicas(s) for s in by_command(compose, "expander").values()) >= 1
    assert sum(replicas(s) for s in by_command(compose, "webhooks").values()) >= 1
    # One active scheduler and a standby: each its own service (its own address), none
    # replicated behind one name (a standby answers UNAVAILABLE: docs/ha.md).
    schedulers = by_command(compose, "scheduler")
    assert len(schedulers) >= 2 and all(replicas(s) == 1 for s in schedulers.values())
    addresses = {f"{n}:{hostport(config_of(s).scheduler.listen)[1]}" for n, s in schedulers.items()}
    for name, svc in sluice_containers(compose).items():
        listed = config_of(svc).deliverer.scheduler.split(",")
        assert set(listed) == addresses and len(listed) == len(addresses), name


def test_mx_lookups_go_to_the_sink_and_webhooks_do_not(compose: dict[str, Any]) -> None:
    services = _services(compose)
    sink = services["sink"]
    sink_ip = sink["networks"]["sluice"]["ipv4_address"]
    cmd = sink["command"]
    assert cmd[cmd.index("--mx-address") + 1] == sink_ip
    sink_smtp_port = hostport(cmd[cmd.index("--smtp-listen") + 1])[1]
    for name in [*by_command(compose, "scheduler"), *by_command(compose, "deliverer")]:
        assert config_of(services[name]).dns.nameservers == (sink_ip,), name
    for name in by_command(compose, "deliverer"):
        assert config_of(services[name]).deliverer.smtp_port == sink_smtp_port, name
    # Webhooks resolve through [dns] when it is set: the sink would answer for every host.
    for name in by_command(compose, "webhooks"):
        assert config_of(services[name]).dns.nameservers == (), name


def _minio_init(compose: dict[str, Any]) -> tuple[dict[str, Any], str]:
    init = _services(compose)["minio-init"]
    script = init["command"][0] if isinstance(init["command"], list) else init["command"]
    return init, script


def _policy() -> dict[str, Any]:
    policy: dict[str, Any] = json.loads((ROOT / "deploy/minio/sluice-policy.json").read_text())
    return policy


def _lifecycle() -> dict[str, Any]:
    rules: dict[str, Any] = json.loads((ROOT / "deploy/minio/lifecycle.json").read_text())
    return rules


def test_payloads_go_to_the_s3_service_and_its_bucket_is_made_for_sluice(
    compose: dict[str, Any],
) -> None:
    services = _services(compose)
    stores = {name: config_of(svc).store for name, svc in sluice_containers(compose).items()}
    store = stores["ingest"]
    assert all(s == store for s in stores.values()), "every Sluice process: the same store"
    parts = urlsplit(store.url)
    assert parts.scheme == "s3"
    bucket = parts.netloc
    endpoint = urlsplit(store.s3_endpoint_url)
    minio = services[endpoint.hostname or ""]
    assert minio["image"].startswith("minio/minio:")
    assert f":{endpoint.port}" == minio["command"][minio["command"].index("--address") + 1]
    assert store.s3_path_style
    init, script = _minio_init(compose)
    assert init["depends_on"]["minio"] == {"condition": "service_healthy"}
    env = env_of(init)
    assert env["S3_BUCKET"] == bucket
    # Sluice signs with the user minio-init creates, not with the root credentials.
    assert (env["S3_ACCESS_KEY"], env["S3_SECRET_KEY"]) == (
        store.s3_access_key_id,
        store.s3_secret_access_key,
    )
    assert store.s3_access_key_id != env_of(minio)["MINIO_ROOT_USER"]
    assert f"mc alias set local {store.s3_endpoint_url} " in script
    for step in (
        'mc mb --ignore-existing "local/$S3_BUCKET"',
        'mc ilm rule import "local/$S3_BUCKET" < /deploy/lifecycle.json',
        "mc admin policy create local sluice-payloads /deploy/sluice-policy.json",
        'mc admin user add local "$S3_ACCESS_KEY" "$S3_SECRET_KEY"',
        'mc admin policy attach local sluice-payloads --user "$S3_ACCESS_KEY"',
    ):
        assert step in script, step
    assert init["volumes"] == ["./deploy/minio:/deploy:ro"]
    (statement,) = _policy()["Statement"]
    assert statement["Resource"] == [f"arn:aws:s3:::{bucket}/*"]
    # What sluice/store.py calls (put, get, delete) and nothing more (docs/storage.md).
    assert set(statement["Action"]) == {"s3:PutObject", "s3:GetObject", "s3:DeleteObject"}
    (rule,) = _lifecycle()["Rules"]
    assert rule["Expiration"]["Days"] * 86400 == store.max_age, "lifecycle = [store] max_age"
    for name in sluice_services(compose):
        deps = services[name]["depends_on"]
        assert deps["minio-init"] == {"condition": "service_completed_successfully"}, name


async def test_the_store_settings_work_against_an_s3_api(
    compose: dict[str, Any], s3_server: S3Server
) -> None:
    store_cfg = config_of(_services(compose)["ingest"]).store
    bucket = urlsplit(store_cfg.url).netloc
    admin = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        region_name=store_cfg.s3_region,
        aws_access_key_id="root",
        aws_secret_access_key="root",
    )
    try:  # mc mb --ignore-existing
        admin.create_bucket(Bucket=bucket)
    except ClientError as exc:
        assert exc.response["Error"]["Code"] in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}
    # The rule file is a valid S3 lifecycle configuration (botocore validates its shape,
    # the server parses it) and reads back with the age of [store] max_age.
    await asyncio.to_thread(
        admin.put_bucket_lifecycle_configuration,
        Bucket=bucket,
        LifecycleConfiguration=_lifecycle(),
    )
    stored = admin.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert [r["Expiration"]["Days"] for r in stored] == [int(store_cfg.max_age // 86400)]
    # Sluice's own client with the stack's settings, only the endpoint moved.
    s3 = S3ObjectStore(
        bucket,
        endpoint_url=s3_server.endpoint,
        region=store_cfg.s3_region,
        access_key_id=store_cfg.s3_access_key_id,
        secret_access_key=store_cfg.s3_secret_access_key,
        path_style=store_cfg.s3_path_style,
    )
    try:
        uri = await s3.put("compose-check", b"payload")
        assert uri == f"s3://{bucket}/compose-check"
        assert await s3.get(uri) == b"payload"
    finally:
        await s3.close()


def test_telemetry_goes_to_the_collector(compose: dict[str, Any]) -> None:
    services = _services(compose)
    collector_cfg = yaml.safe_load((ROOT / "deploy/otel-collector.yaml").read_text())
    grpc_port = hostport(collector_cfg["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"])[1]
    for name, svc in sluice_services(compose).items():
        telemetry = config_of(svc).telemetry
        assert telemetry.exporter == "otlp", name
        endpoint = urlsplit(telemetry.otlp_endpoint)
        assert endpoint.port == grpc_port, name
        collector = services[endpoint.hostname or ""]
        assert collector["image"].startswith("otel/opentelemetry-collector"), name
        assert "otel-collector" in svc["depends_on"], name
    (config_arg,) = [a for a in collector["command"] if a.startswith("--config=")]
    assert f"./deploy/otel-collector.yaml:{config_arg.split('=', 1)[1]}:ro" in collector["volumes"]
    # Every pipeline names components the file defines.
    for pipeline in collector_cfg["service"]["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            assert set(pipeline.get(kind, [])) <= set(collector_cfg[kind]), pipeline


def _health_url(svc: dict[str, Any]) -> str:
    test = svc["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], test
    url: str = test[4]
    return url


def test_every_sluice_service_has_a_health_check_on_its_ops_port(compose: dict[str, Any]) -> None:
    services = _services(compose)
    for name, svc in sluice_services(compose).items():
        cfg = config_of(svc)
        assert cfg.telemetry.ops_listen, f"{name}: [telemetry] ops_listen is off"
        url = urlsplit(_health_url(svc))
        assert url.hostname == "127.0.0.1" and url.path in ("/readyz", "/healthz"), name
        assert url.port == hostport(cfg.telemetry.ops_listen)[1], name
        # Docker sends SIGKILL after stop_grace_period: let the drain finish first.
        grace = config_mod.parse_duration(svc["stop_grace_period"])
        assert grace > cfg.shutdown.drain_timeout, name
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            target = services[dep]
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in target and not target["healthcheck"].get("disable"), (
                    f"{name} waits for {dep} to be healthy, which has no health check"
                )
            if cond["condition"] == "service_completed_successfully":
                assert target.get("restart") in ("no", "on-failure"), f"{dep} is not one-shot"


@pytest.fixture
def stack_overrides() -> dict[str, dict[str, Any]]:
    return {"telemetry": {"ops_listen": f"127.0.0.1:{free_port()}"}}


async def _run(cmd: list[str]) -> int:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    return await asyncio.wait_for(proc.wait(), 30)


async def test_health_checks_pass_when_ready_and_fail_without_nats(
    compose: dict[str, Any], stack: Stack
) -> None:
    """Each service's health check command, run as Docker would (only the interpreter and
    the port differ), against the five services in one process with a real nats-server."""
    ops_port = hostport(stack.cfg.telemetry.ops_listen)[1]
    commands: set[tuple[str, ...]] = set()
    for svc in sluice_services(compose).values():
        code, url = svc["healthcheck"]["test"][3:]
        url = url.replace(f":{urlsplit(url).port}/", f":{ops_port}/")
        commands.add((sys.executable, "-c", code, url))
    assert commands
    for cmd in commands:
        await wait_for(lambda c=list(cmd): _passes(c), 30, f"{cmd[-1]} to pass")
    stack.nats.stop()
    try:
        for cmd in commands:
            await wait_for(lambda c=list(cmd): _fails(c), 30, f"{cmd[-1]} to fail")
    finally:
        if stack.nats.proc is None:
            await asyncio.to_thread(stack.nats.start)
    # Healthy again once NATS is back (and the services can close their connections).
    for cmd in commands:
        await wait_for(lambda c=list(cmd): _passes(c), 30, f"{cmd[-1]} to pass again")


async def _passes(cmd: list[str]) -> bool:
    return await _run(cmd) == 0


async def _fails(cmd: list[str]) -> bool:
    return await _run(cmd) != 0


def _host_ports(spec: str) -> tuple[str, list[int], int]:
    """("ip", host ports, container port) of a short-syntax port mapping."""
    *host, container = spec.split(":")
    ip = host[0] if len(host) == 2 else "0.0.0.0"
    first, _, last = host[-1].partition("-")
    return ip, list(range(int(first), int(last or first) + 1)), int(container)


def test_published_ports_do_not_collide(compose: dict[str, Any]) -> None:
    taken: dict[int, str] = {}
    for name, svc in _services(compose).items():
        for spec in svc.get("ports", []):
            _, ports, _ = _host_ports(spec)
            # Every replica needs a host port of its own.
            assert len(ports) >= replicas(svc), f"{name}: {spec} for {replicas(svc)} replicas"
            for port in ports:
                assert port not in taken, f"host port {port}: {taken.get(port)} and {name}"
                taken[port] = name
    # Inside each Sluice container, its listeners differ; published ports reach them.
    for name, svc in sluice_services(compose).items():
        cfg = config_of(svc)
        listens = [cfg.telemetry.ops_listen]
        if svc["command"][0] == "ingest":
            listens += [cfg.ingest.http_listen, cfg.ingest.grpc_listen]
        if svc["command"][0] == "scheduler":
            listens.append(cfg.scheduler.listen)
        ports = [hostport(a)[1] for a in listens]
        assert len(set(ports)) == len(ports), f"{name}: {listens}"
        assert all(hostport(a)[0] == "0.0.0.0" for a in listens), f"{name}: {listens}"
        for spec in svc.get("ports", []):
            assert _host_ports(spec)[2] in ports, f"{name}: {spec} reaches no listener"


def test_referenced_files_exist(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes", {}))
    for name, svc in _services(compose).items():
        if "build" in svc:
            assert (ROOT / svc["build"] / "Dockerfile").exists(), name
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"


def test_image_builds_from_existing_files() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (\S+(?: \S+)*) \S+$", dockerfile, re.MULTILINE):
        for path in src.split():
            assert (ROOT / path).exists(), f"Dockerfile copies missing {path}"
    assert 'ENTRYPOINT ["sluice"]' in dockerfile


def _documented_metrics() -> set[str]:
    text = (ROOT / "docs/observability.md").read_text()
    return set(re.findall(r"^\| `(sluice_\w+)` \|", text, re.MULTILINE))


def test_prometheus_scrapes_every_service_and_alerts_on_real_metrics(
    compose: dict[str, Any],
) -> None:
    prometheus = _services(compose)["prometheus"]
    assert prometheus["profiles"] == ["metrics"]  # optional
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets: dict[str, int] = {}
    for job in prom["scrape_configs"]:
        assert job["job_name"].startswith("sluice-")
        for sd in job["dns_sd_configs"]:
            targets.update(dict.fromkeys(sd["names"], sd["port"]))
    for name, svc in sluice_services(compose).items():
        assert targets.get(name) == hostport(config_of(svc).telemetry.ops_listen)[1], name
    mounted = {v.split(":")[1] for v in prometheus["volumes"]}
    assert set(prom["rule_files"]) <= mounted
    documented = _documented_metrics()
    assert len(documented) >= 10, "the metric table of docs/observability.md moved"
    rules = yaml.safe_load((ROOT / "deploy/prometheus/sluice-alerts.yml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    used = set()
    for alert in alerts:
        assert alert["labels"]["severity"] in ("page", "warning"), alert["alert"]
        assert alert["annotations"]["summary"], alert["alert"]
        for metric in re.findall(r"\bsluice_\w+", alert["expr"]):
            base = re.sub(r"_(bucket|sum|count)$", "", metric)
            assert base in documented, f"{alert['alert']}: {metric} is not a Sluice metric"
            used.add(base)
    # What docs/operations.md says to alert on.
    assert {
        "sluice_backlog",
        "sluice_messages_deferred_total",
        "sluice_messages_bounced_total",
        "sluice_delivery_latency_seconds",
        "sluice_webhook_posts_total",
    } <= used


async def test_nats_cluster_flags_form_a_cluster_that_takes_r3_streams(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    nodes = ["nats1", "nats2", "nats3"]
    services = _services(compose)
    cluster_ports = {n: free_port() for n in nodes}
    monitor_ports = dict(zip(nodes, free_ports(3), strict=True))
    servers = []
    try:
        for n in nodes:
            args = list(services[n]["command"])
            # Same flags as compose, with loopback addresses and one port per node.
            args = [a.replace("0.0.0.0:6222", f"127.0.0.1:{cluster_ports[n]}") for a in args]
            routes = args.index("--routes") + 1
            for other, port in cluster_ports.items():
                args[routes] = args[routes].replace(f"{other}:6222", f"127.0.0.1:{port}")
            sd = args.index("-sd") + 1
            args[sd] = str(tmp_path / n)
            args[args.index("-m") + 1] = str(monitor_ports[n])
            srv = NatsServer(tmp_path / n, extra_args=args, log_file=tmp_path / f"{n}.log")
            srv.start()
            servers.append(srv)
        env = env_of(services["expander"])
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
        # Each node's health check (what `init` waits for), on its monitoring port.
        for n in nodes:
            test = services[n]["healthcheck"]["test"]
            assert test[:3] == ["CMD", "python", "-c"]
            url = test[4].replace(f":{urlsplit(test[4]).port}/", f":{monitor_ports[n]}/")
            cmd = [sys.executable, "-c", test[3], url]
            await wait_for(lambda c=cmd: _passes(c), 30, f"{n} health check")
        for dep in ("nats1", "nats2", "nats3"):
            assert services["init"]["depends_on"][dep] == {"condition": "service_healthy"}
        assert services["init"]["command"] == ["init"]
    finally:
        for srv in servers:
            srv.stop()
