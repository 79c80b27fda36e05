"""Connecting to NATS and creating the JetStream layout (streams, KV and object buckets).

Every service calls `ensure_layout` at start-up; creation is idempotent, so services can
start in any order. docs/nats.md describes the layout.
"""

from __future__ import annotations

import logging
import math

import nats
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import BucketNotFoundError, NotFoundError

from sluice import names
from sluice.config import Config

__all__ = ["connect", "ensure_layout"]

log = logging.getLogger(__name__)


async def connect(cfg: Config, name: str) -> NatsClient:
    """Connect with endless reconnects: a service outlives a NATS restart."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats: %s", exc)

    return await nats.connect(
        # A cluster is given as comma-separated URLs.
        servers=[u.strip() for u in cfg.nats.url.split(",") if u.strip()],
        name=name,
        connect_timeout=cfg.nats.connect_timeout,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        error_cb=on_error,
    )


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
    for bucket in (
        names.TENANTS_BUCKET,
        names.KEYS_BUCKET,
        names.IDEMPOTENCY_BUCKET,
        names.EXPANDER_BUCKET,
        names.SUPPRESSIONS_BUCKET,
        names.SITES_BUCKET,
        names.LANES_BUCKET,
    ):
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
