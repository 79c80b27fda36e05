"""Configuration: one TOML file (`sluice.toml`) plus `SLUICE_<SECTION>__<KEY>` overrides.

Every setting has a default and a comment here; the comment line(s) right above a field are
its documentation: scripts/genconfig.py turns them into docs/configuration.md (a test fails
when that file is stale or a key has no comment). Unknown sections and keys are errors that
name the file (or variable) and the key. Durations are strings such as
"500ms", "15m" or "72h" (a bare number means seconds) and are held as float seconds.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Config", "ConfigError", "load", "parse_duration"]


class ConfigError(ValueError):
    """A configuration file or variable is invalid; the message names where and which key."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: str | int | float) -> float:
    """Seconds in a duration such as "15m"; numbers are taken as seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNIT[m.group(2)]
    raise ValueError(f'not a duration: {value!r} (use e.g. "30s", "15m", "72h")')


Duration = typing.NewType("Duration", float)


@dataclass(frozen=True)
class NatsConfig:
    """[nats] — how every service reaches JetStream."""

    # Server URL; a cluster as comma-separated URLs.
    url: str = "nats://127.0.0.1:4222"
    # Longest wait for a connection to NATS.
    connect_timeout: Duration = Duration(2.0)
    # Stream and bucket replicas: 1 on a single node, 3 on a production cluster.
    replicas: int = 1
    # Bytes the MAIL stream may hold before publishes are refused (the expander waits).
    mail_max_bytes: int = 8 * 1024**3
    # Bytes the JOBS stream may hold before ingest answers 429 (a backlog of jobs).
    jobs_max_bytes: int = 1024**3
    # How long dead letters are kept.
    dlq_max_age: Duration = Duration(30 * 86400.0)
    # How long events are kept.
    events_max_age: Duration = Duration(7 * 86400.0)
    # User name for user/password authentication (docs/security.md). Use at most one of
    # user/password, token, nkey_seed_file and creds_file; all empty: none (`sluice dev`).
    user: str = ""
    # The password of `user` (set it through SLUICE_NATS__PASSWORD, not in the file).
    password: str = ""
    # A token the server's authorization block expects (SLUICE_NATS__TOKEN).
    token: str = ""
    # Path of an nkey seed file (one "SU..." line): the server knows the public key.
    nkey_seed_file: str = ""
    # Path of a JWT user credentials file (.creds, from `nsc`) for decentralised auth.
    creds_file: str = ""
    # TLS: a CA bundle (PEM) that signs the server's certificate. Setting any tls_* key
    # makes Sluice verify the server against it (empty: the system's CAs). nats-py upgrades
    # to TLS when the server requires it; a "tls://" URL says the same thing explicitly.
    tls_ca_file: str = ""
    # Client certificate (PEM) for servers that verify clients (mutual TLS), with tls_key_file.
    tls_cert_file: str = ""
    # The private key (PEM) of tls_cert_file.
    tls_key_file: str = ""
    # The name the server's certificate must carry, when it differs from the URL's host
    # (e.g. URLs by IP address, certificates by DNS name). Empty: the URL's host.
    tls_server_name: str = ""
    # Start TLS before the server's first message (nats-server tls { handshake_first: true }),
    # so nothing at all crosses the network in the clear.
    tls_handshake_first: bool = False


@dataclass(frozen=True)
class StoreConfig:
    """[store] — where payloads live: `nats-os://<bucket>` (embedded default) or `s3://<bucket>`.

    Payloads are read by their URI whatever `url` says, so switching stores keeps queued mail
    deliverable (the s3_* keys are used for `s3://` reads too).
    """

    # Where new payloads are written: "nats-os://<bucket>" (a JetStream object store) or
    # "s3://<bucket>" (S3 or an S3-compatible server; the bucket must exist).
    url: str = "nats-os://sluice_payloads"
    # Payloads older than this are removed: the NATS bucket's TTL, set by Sluice (0: never).
    # For S3 set a lifecycle rule of the same age (docs/storage.md). Keep it above
    # dlq_max_age + max_schedule_ahead + the longest horizon so a replay finds its payload.
    max_age: Duration = Duration(40 * 86400.0)
    # S3 endpoint, e.g. "http://minio:9000"; empty: AWS's endpoint for s3_region.
    s3_endpoint_url: str = ""
    # S3 region (also signs requests to S3-compatible servers).
    s3_region: str = "us-east-1"
    # Static credentials; empty: the AWS default chain (AWS_* variables, instance role).
    s3_access_key_id: str = ""
    # The secret of s3_access_key_id (prefer the environment variable).
    s3_secret_access_key: str = ""
    # Path-style URLs (http://host/bucket/key), as MinIO and most self-hosted servers need.
    s3_path_style: bool = False


@dataclass(frozen=True)
class IngestConfig:
    """[ingest] — the HTTP/JSON and gRPC edge."""

    # Address of the HTTP/JSON API.
    http_listen: str = "127.0.0.1:8080"
    # Address of the gRPC API.
    grpc_listen: str = "127.0.0.1:50051"
    # Longest wait for JetStream to confirm a job before answering 503.
    publish_timeout: Duration = Duration(2.0)
    # to + cc + bcc of one message.
    max_recipients: int = 50
    # Recipients of one blast.
    max_blast_recipients: int = 100_000
    # Larger HTTP bodies get 413; a 100,000-recipient blast is about 10 MB of JSON.
    max_request_bytes: int = 64 * 1024 * 1024
    # Largest gRPC request (SendBlast carries all its recipients in one message).
    grpc_max_message_bytes: int = 64 * 1024 * 1024
    # Largest attachment.
    max_attachment_bytes: int = 10 * 1024 * 1024
    # Subject, bodies and attachments together.
    max_message_bytes: int = 25 * 1024 * 1024
    # How far ahead send_at may be.
    max_schedule_ahead: Duration = Duration(72 * 3600.0)
    # A repeated request_id / Idempotency-Key returns the first answer for this long.
    idempotency_ttl: Duration = Duration(24 * 3600.0)
    # Messages per streamed batch: one payload object and one job publish per batch.
    stream_batch: int = 500
    # Wait at most this long to fill a streamed batch.
    stream_linger: Duration = Duration(0.005)
    # How long an API key lookup is cached (revocation takes at most this long).
    key_cache_ttl: Duration = Duration(10.0)


@dataclass(frozen=True)
class ExpanderConfig:
    """[expander] — fans job records out into delivery pointers."""

    # Job batches expanded at once per process.
    concurrency: int = 4
    # A batch held by an expander that died is redelivered after this long.
    ack_wait: Duration = Duration(30.0)
    # Hash-bucket lanes for domains without dedicated queues (the scheduler finds lanes from
    # the stored subjects, so changing this lets old lanes drain).
    buckets: int = 16
    # A domain with at least this many recipients in one job gets dedicated queues (lane d).
    # (256: the most one job's lane mail to a domain then is 255, which a deliverer's queue
    # for one site holds; docs/scheduling.md, Bounded consumers.)
    dedicated_threshold: int = 256
    # A domain keeps its dedicated queues this long after its last such job (KV sluice_lanes).
    dedicated_ttl: Duration = Duration(3600.0)


@dataclass(frozen=True)
class SchedulerConfig:
    """[scheduler] — the lease service."""

    # Address of the gRPC lease service.
    listen: str = "127.0.0.1:50061"
    # TLS for the lease service (docs/security.md): the server certificate (PEM, its chain
    # after it) and tls_key_file. Empty: plaintext gRPC (`sluice dev`, loopback only).
    tls_cert_file: str = ""
    # The private key (PEM) of tls_cert_file.
    tls_key_file: str = ""
    # Mutual TLS: a CA bundle (PEM); deliverers must present a certificate it signed.
    # Empty: client certificates are not asked for.
    tls_client_ca_file: str = ""
    # A lease not renewed within this is reclaimed.
    lease_ttl: Duration = Duration(30.0)
    # Several schedulers may run: the one holding the leader lock (KV sluice_scheduler) is
    # active, the others are standbys that answer UNAVAILABLE. The lock lives this long
    # unrenewed (whole seconds, at least 1 s; renewed every third of it), so a standby takes
    # over about this long after the active one dies; it then grants nothing until the old
    # leases have run out (4/3 lease_ttl, docs/ha.md).
    leader_ttl: Duration = Duration(5.0)
    # How often the backlog per queue is read from JetStream (one of 1,000 subjects or more:
    # as often only while mail is being stored, else every 5 s; docs/scheduling.md).
    backlog_interval: Duration = Duration(1.0)
    # Path of the shaping rules (TOML); empty means the built-in default.
    shaping: str = ""
    # Each throttle report multiplies a site's limits by this.
    throttle_decrease: float = 0.5
    # Also suspend a throttled site this long (0: no suspension).
    suspend_on_throttle: Duration = Duration(0.0)
    # After this many successes in a row a throttled site gains recover_step of its limits.
    recover_after: int = 20
    # Fraction of the configured limits a throttled site regains per step.
    recover_step: float = 0.1
    # At most one decrease per site this often: a burst of 421s is one signal.
    throttle_cooldown: Duration = Duration(5.0)
    # How often the reaper sweeps for messages a MAX_DELIVERIES advisory missed.
    sweep_interval: Duration = Duration(300.0)
    # No effect since bucket mail waits per site in the deliverer (a lane is fetched by one
    # loop; its connections come from its sites' leases, docs/scheduling.md); kept so that
    # configurations that set it still load. A lane's lease carries it as max_connections.
    bucket_connections: int = 4
    # A mail consumer with nothing stored on its subjects and no lease is deleted after this.
    # (5 s took a long tail's consumers from 41-46 on average to 25-34, with no CPU
    # difference that showed: docs/scheduling.md, Bounded consumers.)
    consumer_idle: Duration = Duration(60.0)
    # A domain whose MX lookups fail (timeout, SERVFAIL) and whose site was never found gets
    # no lease for this long (looked up again 5 s after each failure, when the backlog or a
    # deliverer still names it): a lookup failed for a moment must not make the domain a site
    # of its own, with connections to its provider's MX hosts on top of that site's limit.
    # Then it is its own site, and the deliverer defers its mail.
    lookup_grace: Duration = Duration(60.0)


@dataclass(frozen=True)
class DelivererConfig:
    """[deliverer] — works leases, speaks SMTP."""

    # The scheduler's address; with standby schedulers, all of them comma-separated
    # ("host1:50061,host2:50061"): calls go to the active one and fail over on UNAVAILABLE.
    scheduler: str = "127.0.0.1:50061"
    # TLS to the scheduler: a CA bundle (PEM) that signs its certificate; setting it (or
    # scheduler_tls_cert_file) makes the channels TLS. Empty with the cert empty: plaintext.
    scheduler_tls_ca_file: str = ""
    # Client certificate (PEM) for a scheduler that requires one (mutual TLS).
    scheduler_tls_cert_file: str = ""
    # The private key (PEM) of scheduler_tls_cert_file.
    scheduler_tls_key_file: str = ""
    # The name the scheduler's certificate must carry when it differs from the address's
    # host (e.g. addresses by IP). Empty: the host of each address.
    scheduler_tls_server_name: str = ""
    # The EHLO hostname (set it to the sending host's name).
    ehlo_name: str = "localhost"
    # The port MX hosts are contacted on (25 in production; tests and `sluice dev` change it).
    smtp_port: int = 25
    # Site leases one process works at once (hash-bucket lanes, shared out between the
    # deliverers, come on top).
    max_leases: int = 16
    # SMTP connections one lease may use in this process (the lease caps it too).
    connections_per_lease: int = 4
    # How often leases are renewed (and their queues refreshed); at most lease_ttl / 3.
    renew_interval: Duration = Duration(1.0)
    # Extra regular expressions that mark a 4xx reply as throttling (e.g. a provider code).
    throttle_patterns: tuple[str, ...] = ()
    # Domains whose mail must go over STARTTLS (not offered: a temporary failure).
    require_tls_domains: tuple[str, ...] = ()
    # VERP: MAIL FROM becomes bounce+<delivery id>@<verp_domain>, so a bounce report names
    # the message and recipient. Empty: MAIL FROM is the From address.
    verp_domain: str = ""
    # Pointers fetched per pull.
    fetch_batch: int = 32
    # Wait between lease requests when there is no work (cut short when a lease ends).
    idle_poll: Duration = Duration(0.5)
    # Hash-bucket mail whose site is at its connection limit waits this long for a
    # connection there (asking again every few hundred ms) before it is handed back; at most
    # a third of ack_wait.
    site_wait: Duration = Duration(5.0)
    # TCP connect and greeting.
    connect_timeout: Duration = Duration(30.0)
    # Per SMTP command (RFC 5321 4.5.3.2: 5 minutes for the greeting, MAIL and RCPT).
    command_timeout: Duration = Duration(300.0)
    # For the reply to the end of DATA (RFC 5321 4.5.3.2: 10 minutes).
    data_timeout: Duration = Duration(600.0)
    # Pointers are redelivered by JetStream if not acknowledged within this time.
    ack_wait: Duration = Duration(60.0)
    # Payloads kept in the per-process LRU cache.
    payload_cache_size: int = 256


@dataclass(frozen=True)
class DnsConfig:
    """[dns] — the resolver shared by scheduler and deliverer."""

    # Empty means the system's /etc/resolv.conf.
    nameservers: tuple[str, ...] = ()
    # Port of the nameservers.
    port: int = 53
    # Per lookup.
    timeout: Duration = Duration(5.0)
    # Route overrides, "domain=host[:port]" ("*" for every domain): a smart host or a test
    # server instead of the MX lookup.
    routes: tuple[str, ...] = ()


@dataclass(frozen=True)
class RetryConfig:
    """[retry] — the ladder of redelivery delays and the horizons that end it."""

    # Delays between attempts, chosen by the message's age; the last one repeats.
    ladder: tuple[Duration, ...] = tuple(
        Duration(s) for s in (60, 300, 900, 1800, 3600, 7200, 14400, 28800)
    )
    # A critical message older than this is dead-lettered.
    horizon_critical: Duration = Duration(3600.0)
    # A transactional message older than this is dead-lettered.
    horizon_transactional: Duration = Duration(72 * 3600.0)
    # A bulk message older than this is dead-lettered.
    horizon_bulk: Duration = Duration(72 * 3600.0)
    # Fraction of each delay added at random so a backlog does not return as one wave.
    jitter: float = 0.1
    # JetStream MaxDeliver: a backstop against poison messages, far above the ladder.
    max_deliver: int = 200


@dataclass(frozen=True)
class WebhooksConfig:
    """[webhooks] — signed event delivery to tenants."""

    # Per POST.
    timeout: Duration = Duration(10.0)
    # Retry delays, chosen by the event's age; the last one repeats.
    ladder: tuple[Duration, ...] = tuple(
        Duration(s) for s in (5, 30, 120, 600, 1800, 3600, 7200, 14400)
    )
    # Give up (and log) after this long; the spec asks for at least 24 h.
    horizon: Duration = Duration(26 * 3600.0)
    # Allow loopback and private targets (tests, `sluice dev`); off in production.
    allow_private_targets: bool = False
    # Networks (CIDR) webhooks may reach although not public, e.g. ["10.1.2.0/24"] for an
    # internal receiver; checked on the address connected to, like the public-only rule.
    allowed_networks: tuple[str, ...] = ()
    # A batching endpoint (WebhookEndpoint.batch_size > 1) gets a POST when its batch is
    # full or this long after the batch's first event.
    batch_wait: Duration = Duration(1.0)
    # Webhook POSTs in flight per process.
    concurrency: int = 16
    # POSTs in flight per endpoint: a hanging endpoint holds at most this many workers.
    per_endpoint_concurrency: int = 4


@dataclass(frozen=True)
class SuppressionConfig:
    """[suppression] — which bounces suppress a recipient for its tenant, and for how long."""

    # Bounce categories that suppress until the entry is removed (SES/Postmark behaviour).
    hard_categories: tuple[str, ...] = ("bad_mailbox", "bad_domain")
    # Bounce categories that suppress for `soft_ttl` only (the mailbox may be emptied).
    soft_categories: tuple[str, ...] = ("mailbox_full",)
    # How long a soft bounce suppresses.
    soft_ttl: Duration = Duration(3 * 86400.0)


@dataclass(frozen=True)
class TelemetryConfig:
    """[telemetry] — OpenTelemetry export: "none", "console" or "otlp"."""

    # Where spans go (docs/observability.md): "none" (no tracer provider; the API's no-ops),
    # "console" (stdout) or "otlp" (OTLP/gRPC to otlp_endpoint; metrics are pushed there too).
    exporter: str = "none"
    # The OpenTelemetry service.namespace resource attribute.
    service_namespace: str = "sluice"
    # OTLP/gRPC collector, e.g. "http://otel-collector:4317"; empty: the SDK's default
    # (OTEL_EXPORTER_OTLP_ENDPOINT, else http://localhost:4317).
    otlp_endpoint: str = ""
    # Fraction of new traces recorded (0.0-1.0); a trace started by a client's traceparent
    # follows that parent's sampled flag.
    sample_ratio: float = 1.0
    # OpenTelemetry metrics, exposed in Prometheus format on /metrics (ops_listen).
    metrics: bool = True
    # Where this process serves /healthz, /readyz and /metrics (docs/health.md), e.g.
    # "0.0.0.0:9090"; empty: off. One address per process (`sluice dev` picks a free one).
    ops_listen: str = ""
    # Where this process serves the gRPC health service (grpc.health.v1) for all its
    # services; empty: off. Ingest and the scheduler also serve it on their own gRPC ports.
    health_grpc_listen: str = ""


@dataclass(frozen=True)
class ShutdownConfig:
    """[shutdown] — how a process stops on SIGTERM/SIGINT."""

    # The longest a service waits for the work in hand (requests, jobs, webhook POSTs, SMTP
    # transactions) before it stops regardless; unfinished work is not acknowledged, so
    # JetStream redelivers it. Keep it below the orchestrator's grace period (Kubernetes
    # terminationGracePeriodSeconds, 30 s by default).
    drain_timeout: Duration = Duration(20.0)


@dataclass(frozen=True)
class Config:
    """The whole configuration; every section is optional in the file."""

    nats: NatsConfig = field(default_factory=NatsConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    expander: ExpanderConfig = field(default_factory=ExpanderConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    deliverer: DelivererConfig = field(default_factory=DelivererConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    webhooks: WebhooksConfig = field(default_factory=WebhooksConfig)
    suppression: SuppressionConfig = field(default_factory=SuppressionConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)

    def horizon(self, tier_token: str) -> float:
        """The retry horizon of a tier ("critical", "transactional", "bulk")."""
        return float(getattr(self.retry, f"horizon_{tier_token}"))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a TOML or environment value to the declared field type."""
    origin = typing.get_origin(tp)
    try:
        if tp is Duration:
            return Duration(parse_duration(value))
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in {"1", "true", "yes", "on"}:
                return True
            if isinstance(value, str) and value.lower() in {"0", "false", "no", "off"}:
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if tp is int:
            if isinstance(value, bool):
                raise ValueError(f"not an integer: {value!r}")
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            if not isinstance(value, str):
                raise ValueError(f"not a string: {value!r}")
            return value
        if origin is tuple:
            (item_tp, _) = typing.get_args(tp)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise ValueError(f"not a list: {value!r}")
            return tuple(_coerce(v, item_tp, where) for v in value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    raise ConfigError(f"{where}: unsupported type {tp!r}")  # pragma: no cover


def _section_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls, globalns=globals())
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _merge(raw: Mapping[str, Mapping[str, Any]], source: str) -> dict[str, dict[str, Any]]:
    sections = _section_types(Config)
    out: dict[str, dict[str, Any]] = {}
    for name, values in raw.items():
        if name not in sections:
            raise ConfigError(f"{source}: unknown section [{name}]")
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: [{name}] must be a table")
        fields = _section_types(sections[name])
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(f"{source}: unknown key {key!r} in [{name}]")
            out.setdefault(name, {})[key] = _coerce(value, fields[key], f"{source}: [{name}] {key}")
    return out


def _from_env(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    raw: dict[str, dict[str, Any]] = {}
    for var, value in environ.items():
        if not var.startswith("SLUICE_") or var in _NOT_CONFIG_VARS:
            continue
        rest = var[len("SLUICE_") :]
        if "__" not in rest:
            raise ConfigError(f"environment: {var} is not SLUICE_<SECTION>__<KEY>")
        section, key = rest.split("__", 1)
        raw.setdefault(section.lower(), {})[key.lower()] = value
    return _merge(raw, "environment")


# Variables with the SLUICE_ prefix that are not settings.
_NOT_CONFIG_VARS = frozenset({"SLUICE_CONFIG"})


def load(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Load the config file (default: $SLUICE_CONFIG, else ./sluice.toml if present)."""
    env = os.environ if environ is None else environ
    merged: dict[str, dict[str, Any]] = {}
    if path is None:
        path = env.get("SLUICE_CONFIG") or ("sluice.toml" if Path("sluice.toml").exists() else None)
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"{p}: file not found") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: {exc}") from exc
        merged = _merge(data, str(p))
    for section, values in _from_env(env).items():
        merged.setdefault(section, {}).update(values)
    return build(merged)


def build(values: Mapping[str, Mapping[str, Any]]) -> Config:
    """A Config from already-typed section values (used by load, tests and `sluice dev`)."""
    sections = _section_types(Config)
    kwargs = {name: sections[name](**dict(vals)) for name, vals in values.items()}
    return Config(**kwargs)


def replace(cfg: Config, **sections: Mapping[str, Any]) -> Config:
    """A copy of cfg with some keys of some sections replaced (values are coerced)."""
    merged = _merge(sections, "override")
    changes = {
        name: dataclasses.replace(getattr(cfg, name), **vals) for name, vals in merged.items()
    }
    return dataclasses.replace(cfg, **changes)
