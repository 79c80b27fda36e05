"""Connecting to NATS and creating the JetStream layout (streams, KV and object buckets).

Every service calls `ensure_layout` at start-up; creation is idempotent, so services can
start in any order. docs/nats.md describes the layout.
"""

from __future__ import annotations

import logging
import math
import ssl
from pathlib import Path
from typing import Any

from nats import errors as nats_errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import BucketNotFoundError, NotFoundError

from sluice import names
from sluice.config import Config, ConfigError, NatsConfig

__all__ = ["NatsRefused", "connect", "ensure_layout", "tls_context"]

log = logging.getLogger(__name__)


class NatsRefused(Exception):
    """The NATS server refused Sluice's credentials or its TLS: a configuration error that
    retrying cannot fix (docs/security.md)."""


def _auth_options(n: NatsConfig) -> dict[str, Any]:
    """nats-py's connect() arguments for the one authentication method configured."""
    methods = {
        "user/password": bool(n.user or n.password),
        "token": bool(n.token),
        "nkey_seed_file": bool(n.nkey_seed_file),
        "creds_file": bool(n.creds_file),
    }
    chosen = [m for m, on in methods.items() if on]
    if len(chosen) > 1:
        raise ConfigError(f"[nats]: choose one authentication method, not {' and '.join(chosen)}")
    if n.user or n.password:
        return {"user": n.user, "password": n.password}
    if n.token:
        return {"token": n.token}
    for path in (n.nkey_seed_file, n.creds_file):
        if path and not Path(path).is_file():
            raise ConfigError(f"[nats]: no such file {path!r}")
    if n.nkey_seed_file:
        return {"nkeys_seed": n.nkey_seed_file}
    if n.creds_file:
        return {"user_credentials": n.creds_file}
    return {}


def tls_context(n: NatsConfig) -> ssl.SSLContext | None:
    """The TLS context for NATS connections; None when no [nats] tls_* key is set (nats-py
    then verifies a TLS server against the system's CAs)."""
    if not (n.tls_ca_file or n.tls_cert_file or n.tls_key_file):
        return None
    if bool(n.tls_cert_file) != bool(n.tls_key_file):
        raise ConfigError("[nats]: tls_cert_file and tls_key_file go together")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=n.tls_ca_file or None)
        if n.tls_cert_file:
            ctx.load_cert_chain(n.tls_cert_file, n.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"[nats]: TLS files: {exc}") from exc
    return ctx


def _is_refusal(exc: BaseException) -> bool:
    """Errors of the first connection that no retry fixes: credentials or TLS (a TLS
    connection that merely closed early may be a server still starting, so not those)."""
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return False
    if isinstance(exc, nats_errors.AuthorizationError | ssl.SSLError):
        return True
    text = str(exc).lower()
    return any(
        refusal in text
        for refusal in (
            "authorization violation",
            "user authentication expired",
            "user authentication revoked",
            "account authentication expired",
        )
    )


async def connect(cfg: Config, name: str) -> NatsClient:
    """Connect with endless reconnects: a service outlives a NATS restart.

    A server that is not there yet is waited for; one that refuses the credentials or
    the TLS handshake of the first connection raises NatsRefused at once (retrying cannot
    fix a configuration error).
    """
    n = cfg.nats
    servers = [u.strip() for u in n.url.split(",") if u.strip()]
    options = _auth_options(n)
    tls = tls_context(n)
    if tls is not None:
        options["tls"] = tls
    if n.tls_server_name:
        options["tls_hostname"] = n.tls_server_name
    first = True

    async def on_error(exc: Exception) -> None:
        if first and _is_refusal(exc):
            # Raised through nats-py's connect loop, which awaits this callback.
            raise NatsRefused(f"nats: {', '.join(servers)} refused {name}: {exc}") from exc
        log.warning("nats: %s", exc)

    options.update(
        # A cluster is given as comma-separated URLs.
        servers=servers,
        name=name,
        connect_timeout=n.connect_timeout,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        error_cb=on_error,
        tls_handshake_first=n.tls_handshake_first,
    )
    nc = NatsClient()
    try:
        await nc.connect(**options)
    except NatsRefused:
        # Not nc.close(): after a failed TLS upgrade it waits for ever on the plain stream
        # the TLS one replaced. Nothing but the socket has been started at this point.
        transport: Any = nc._transport
        if transport is not None:
            transport.close()
        raise
    first = False
    return nc


async def ensure_layout(js: JetStreamContext, cfg: Config) -> None:
    """Create the streams and buckets Sluice needs, if missing."""
    streams = [
        js_api.StreamConfig(
            name=names.JOBS_STREAM,
            subjects=[names.JOBS_SUBJECTS],
            retention=js_api.RetentionPolicy.WORK_QUEUE,
            storage=js_api.StorageType.FILE,
            num_replicas=cfg.nats.replicas,
            # A full backlog refuses new jobs (ingest answers 429) instead of dropping old.
            discard=js_api.DiscardPolicy.NEW,
            max_bytes=cfg.nats.jobs_max_bytes,
            duplicate_window=120.0,
        ),
        js_api.StreamConfig(
            name=names.MAIL_STREAM,
            subjects=[names.MAIL_SUBJECTS],
            retention=js_api.RetentionPolicy.WORK_QUEUE,
            storage=js_api.StorageType.FILE,
            num_replicas=cfg.nats.replicas,
            # A full backlog refuses new mail (ingest answers 429) instead of dropping old.
            discard=js_api.DiscardPolicy.NEW,
            max_bytes=cfg.nats.mail_max_bytes,
            duplicate_window=120.0,
            # Atomic batches: the expander commits each chunk of pointers all or nothing.
            allow_atomic=True,
        ),
        js_api.StreamConfig(
            name=names.EVENTS_STREAM,
            subjects=[names.EVENTS_SUBJECTS],
            retention=js_api.RetentionPolicy.LIMITS,
            storage=js_api.StorageType.FILE,
            num_replicas=cfg.nats.replicas,
            max_age=cfg.nats.events_max_age,
            duplicate_window=120.0,
            allow_atomic=True,
        ),
        js_api.StreamConfig(
            name=names.DLQ_STREAM,
            subjects=[names.DLQ_SUBJECTS, names.WEBHOOK_DLQ_SUBJECTS],
            retention=js_api.RetentionPolicy.LIMITS,
            storage=js_api.StorageType.FILE,
            num_replicas=cfg.nats.replicas,
            max_age=cfg.nats.dlq_max_age,
            # Dead letters are written create-only, one per subject.
            max_msgs_per_subject=1,
        ),
        js_api.StreamConfig(
            name=names.WEBHOOKS_STREAM,
            subjects=[names.WEBHOOKS_SUBJECTS],
            retention=js_api.RetentionPolicy.WORK_QUEUE,
            storage=js_api.StorageType.FILE,
            num_replicas=cfg.nats.replicas,
            duplicate_window=120.0,
        ),
        js_api.StreamConfig(
            name=names.ADVISORIES_STREAM,
            subjects=[names.ADVISORIES_SUBJECTS],
            retention=js_api.RetentionPolicy.WORK_QUEUE,
            storage=js_api.StorageType.FILE,
            num_replicas=cfg.nats.replicas,
            max_age=7 * 86400.0,
        ),
    ]
    assert tuple(st.name for st in streams) == names.STREAMS
    for stream in streams:
        assert stream.name is not None
        try:
            await js.stream_info(stream.name)
        except NotFoundError:
            await js.add_stream(stream)
            log.info("created stream %s", stream.name)
            continue
        # Bring an existing stream up to this version's settings (a no-op when equal).
        await js.update_stream(stream)
    for bucket in names.KV_BUCKETS:
        try:
            await js.key_value(bucket)
        except BucketNotFoundError:
            await js.create_key_value(bucket=bucket, history=5, replicas=cfg.nats.replicas)
            log.info("created KV bucket %s", bucket)
    try:
        await js.key_value(names.SCHEDULER_BUCKET)
    except BucketNotFoundError:
        # The leader lock: one revision per key, so a create-only write (expected last
        # sequence 0) succeeds once the holder's entry has expired (scheduler/leader.py).
        await js.create_key_value(
            bucket=names.SCHEDULER_BUCKET, history=1, replicas=cfg.nats.replicas
        )
        log.info("created KV bucket %s", names.SCHEDULER_BUCKET)


async def kv_put_ttl(js: JetStreamContext, bucket: str, key: str, value: bytes, ttl: float) -> None:
    """Put a KV entry that the server removes after `ttl` seconds (per-message TTL; nats-py's
    KV API has no TTL argument)."""
    await js.publish(
        f"$KV.{bucket}.{key}", value, headers={"Nats-TTL": f"{max(1, math.ceil(ttl))}s"}
    )
