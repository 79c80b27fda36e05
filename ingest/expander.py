"""The expander: job batches in, one DeliveryPointer per envelope recipient out.

Crash-safe and idempotent without relying on the 2-minute dedup window. A batch's pointers
are cut into deterministic chunks (the order never changes: recipients grouped by domain, in
job order within a domain); each chunk is ONE atomic JetStream batch whose first message is
a marker on sluice.mail.chunks.<batch_id>.g<k> published with
Nats-Expected-Last-Subject-Sequence: 0.
No consumer reads marker subjects, so a chunk that was committed once can never be committed
again (the server refuses the whole batch with 10071): after a crash, at any moment and after
any delay, a restarted expander re-derives the same chunks, skips those whose marker exists,
and commits the rest. Chunks are independent, so several are in flight at once.

Grouping by domain puts a domain's mail next to each other in its queue, so a deliverer
fetches it together and sends it over one connection: a long tail of small domains whose
few messages each were spread over a whole blast took a connection per message. A batch
whose expansion began before grouping (markers ...<batch_id>.<k>, no g) goes on in job order.

When every chunk is in: the job-level `accepted` events, a KV record that the batch is done,
the markers purged, and only then the JOBS message acknowledged. A redelivered batch that is
done is acknowledged at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import orjson
from google.protobuf.timestamp_pb2 import Timestamp
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import APIError as JsApiError
from nats.js.errors import KeyNotFoundError
from opentelemetry.trace import SpanKind

from ingest.validate import normalise_domain
from sluice import names
from sluice.atomic import MAX_BATCH, publish_atomic
from sluice.config import Config
from sluice.consume import consume
from sluice.health import ServiceHealth, nats_problems
from sluice.lanes import Lanes
from sluice.nats_layout import connect, ensure_layout, kv_put_ttl
from sluice.outcomes import WRONG_LAST_SEQUENCE, BatchPublisher
from sluice.store import PayloadStore, open_store
from sluice.suppressions import Suppressions
from sluice.telemetry import count_suppressed, extract, inject, trace_headers, tracer
from sluice.tenants import now_ts
from sluice.v1 import messages_pb2

__all__ = ["Expander", "serve"]

log = logging.getLogger(__name__)
_tracer = tracer("expander")

CHUNK = MAX_BATCH - 1  # pointers per chunk; the marker is the batch's thousandth message
_IN_FLIGHT = 4  # chunks committed concurrently per batch (the server allows 50 per stream)
_DONE_TTL = 7 * 86400


def marker_subject(batch_id: str, chunk: int, grouped: bool = True) -> str:
    return f"sluice.mail.chunks.{batch_id}.{'g' if grouped else ''}{chunk}"


@dataclass
class Item:
    """One recipient of a batch, in deterministic order."""

    job: messages_pb2.JobRecord
    index: int
    email: str
    name: str
    substitutions: dict[str, str]
    message_id: str


class Expander:
    def __init__(
        self,
        cfg: Config,
        nc: NatsClient,
        js: JetStreamContext,
        store: PayloadStore,
        suppressions: Suppressions,
        lanes: Lanes,
    ) -> None:
        self._cfg = cfg
        self._nc = nc
        self._js = js
        self._store = store
        self._suppressions = suppressions
        self._lanes = lanes
        self._keys: dict[str, tuple[str, str]] = {}
        # (published together; an event repeated after a crash is deduplicated by its id)
        self._events = BatchPublisher(nc, names.EVENTS_STREAM)

    def _domain(self, email: str) -> tuple[str, str]:
        """(normalised domain, subject key) of an address, cached per domain."""
        raw = email.rpartition("@")[2]
        hit = self._keys.get(raw)
        if hit is None:
            domain = normalise_domain(raw)
            hit = self._keys[raw] = (domain, names.domain_key(domain))
        return hit

    async def _items(self, job: messages_pb2.JobRecord) -> list[Item]:
        if not job.recipients_ref:
            return [
                Item(job, i, r.email, "", {}, r.message_id) for i, r in enumerate(job.recipients)
            ]
        data = await self._store.get(job.recipients_ref)
        domain = normalise_domain(job.envelope_from.rpartition("@")[2])
        prefix = f"{job.job_id}."
        if job.recipients_format == messages_pb2.RECIPIENTS_FORMAT_JSON:
            rows: list[dict[str, Any]] = orjson.loads(data)
            return [
                Item(
                    job,
                    i,
                    r["email"],
                    r.get("name") or "",
                    r.get("substitutions") or {},
                    f"{prefix}{i}@{domain}",
                )
                for i, r in enumerate(rows)
            ]
        recipients = messages_pb2.BlastRecipients.FromString(data).recipients
        return [
            Item(job, i, r.email, r.name, dict(r.substitutions), f"{prefix}{i}@{domain}")
            for i, r in enumerate(recipients)
        ]

    def _pointer(self, item: Item, busy: frozenset[str]) -> tuple[str, bytes]:
        job = item.job
        domain, key = self._domain(item.email)
        p = messages_pb2.DeliveryPointer(
            delivery_id=f"{job.job_id}-{item.index}",
            job_id=job.job_id,
            message_id=item.message_id,
            tenant_id=job.tenant_id,
            tier=job.tier,
            recipient=item.email,
            domain=domain,
            payload_ref=job.payload_ref,
            envelope_from=job.envelope_from,
            accepted_at=_due(job),
            index=item.index,
        )
        # (only when there are any: protobuf copies an empty map too)
        if item.name:
            p.recipient_name = item.name
        if item.substitutions:
            p.substitutions.update(item.substitutions)
        if job.HasField("expires_at"):
            p.expires_at.CopyFrom(job.expires_at)
        lane = self._lanes.lane(key, key in busy)
        return names.mail_subject(job.tier, lane, key, job.tenant_id), p.SerializeToString()

    def _suppressed_event(self, item: Item) -> tuple[str, bytes, dict[str, str]]:
        job = item.job
        event = messages_pb2.Event(
            event_id=f"evt_{job.job_id}-{item.index}_suppressed",
            tenant_id=job.tenant_id,
            type=messages_pb2.EVENT_TYPE_SUPPRESSED,
            job_id=job.job_id,
            message_id=item.message_id,
            recipient=item.email,
            tier=job.tier,
            timestamp=now_ts(),
            tags=job.tags,
            metadata=job.metadata,
        )
        subject = names.event_subject(job.tenant_id, event.type, job.job_id, item.index)
        return subject, event.SerializeToString(), {"Nats-Msg-Id": event.event_id}

    async def _committed_markers(self, batch_id: str) -> set[str]:
        """The last tokens of the batch's chunk markers present: "g3" (grouped), "3"."""
        info = await self._js.stream_info(
            names.MAIL_STREAM, subjects_filter=f"sluice.mail.chunks.{batch_id}.*"
        )
        return {s.rsplit(".", 1)[1] for s in (info.state.subjects or {})}

    async def _commit_chunk(
        self,
        batch_id: str,
        k: int,
        items: list[Item],
        busy: frozenset[str],
        grouped: bool = True,
    ) -> int:
        """Commit chunk k once; returns pointers published (0 if it was already in)."""
        msgs: list[tuple[str, bytes, dict[str, str] | None]] = [
            (
                marker_subject(batch_id, k, grouped),
                str(len(items)).encode(),
                {"Nats-Expected-Last-Subject-Sequence": "0"},
            )
        ]
        # Every pointer and event carries the job's trace context (one dict per chunk).
        trace = trace_headers()
        events = []
        for item in items:
            if self._suppressions.suppressed(item.job.tenant_id, item.email):
                events.append(self._suppressed_event(item))
            else:
                subject, data = self._pointer(item, busy)
                msgs.append((subject, data, trace))
        for subject, data, headers in events:
            if trace:
                headers.update(trace)
            await self._js.publish(subject, data, stream=names.EVENTS_STREAM, headers=headers)
        try:
            await publish_atomic(self._nc, msgs)
        except JsApiError as exc:
            if exc.err_code == WRONG_LAST_SEQUENCE:
                return 0  # committed before (an earlier attempt or another expander)
            raise
        if events:
            count_suppressed(items[0].job.tier, len(events))
        return len(msgs) - 1

    async def expand(self, batch: messages_pb2.JobBatch, progress: Any = None) -> int:
        """Publish every pointer of the batch exactly once; returns how many were new."""
        items: list[Item] = []
        for job in batch.jobs:
            items.extend(await self._items(job))
        # Domains with many recipients in this batch get (or keep) dedicated queues.
        per_domain = Counter(self._domain(item.email)[1] for item in items)
        busy = frozenset(
            key for key, n in per_domain.items() if n >= self._cfg.expander.dedicated_threshold
        )
        await self._lanes.promote(busy)
        markers = await self._committed_markers(batch.batch_id)
        # Chunk k must hold the same recipients at every attempt: a batch begun in job order
        # (by an expander from before grouping) is finished in job order.
        grouped = not any(m.isdigit() for m in markers)
        if grouped:
            items.sort(key=lambda item: self._domain(item.email)[1])  # (stable)
        chunks = [items[i : i + CHUNK] for i in range(0, len(items), CHUNK)]
        prefix = "g" if grouped else ""
        todo = [k for k in range(len(chunks)) if f"{prefix}{k}" not in markers]
        sem = asyncio.Semaphore(_IN_FLIGHT)
        published = 0

        async def one(k: int) -> None:
            nonlocal published
            async with sem:
                published += await self._commit_chunk(batch.batch_id, k, chunks[k], busy, grouped)
                if progress is not None:
                    await progress()

        await asyncio.gather(*(one(k) for k in todo))
        return published

    async def _accepted_events(self, batch: messages_pb2.JobBatch) -> None:
        """An `accepted` event per job, published together: a streamed batch of 500
        messages was 500 publishes one after the other, each waiting for its PubAck."""

        def message(job: messages_pb2.JobRecord) -> tuple[str, bytes, dict[str, str]]:
            event = messages_pb2.Event(
                event_id=f"evt_{job.job_id}_accepted",
                type=messages_pb2.EVENT_TYPE_ACCEPTED,
                tenant_id=job.tenant_id,
                job_id=job.job_id,
                tier=job.tier,
                timestamp=job.accepted_at,
                recipient_count=job.recipient_count or len(job.recipients),
                recipients=[r.email for r in job.recipients],
                message_id=job.recipients[0].message_id if job.recipients else "",
            )
            if job.tags:
                event.tags.extend(job.tags)
            if job.metadata:
                event.metadata.update(job.metadata)
            return (
                names.event_subject(job.tenant_id, event.type, job.job_id, "job"),
                event.SerializeToString(),
                inject({"Nats-Msg-Id": event.event_id}),
            )

        await self._events.publish_many([message(job) for job in batch.jobs])

    async def _is_done(self, batch_id: str) -> bool:
        kv = await self._js.key_value(names.EXPANDER_BUCKET)
        try:
            await kv.get(batch_id)
            return True
        except KeyNotFoundError:
            return False

    async def _mark_done(self, batch_id: str) -> None:
        """Record completion first: once markers are purged they no longer guard chunks."""
        await kv_put_ttl(self._js, names.EXPANDER_BUCKET, batch_id, b"done", _DONE_TTL)
        await self._purge_markers(batch_id)

    async def _purge_markers(self, batch_id: str) -> None:
        await self._js.purge_stream(names.MAIL_STREAM, subject=f"sluice.mail.chunks.{batch_id}.>")

    async def handle(self, msg: Msg) -> None:
        try:
            batch = messages_pb2.JobBatch.FromString(msg.data)
        except Exception:
            log.error("undecodable job batch terminated (seq %s)", msg.metadata.sequence.stream)
            await msg.term()
            return
        if await self._is_done(batch.batch_id):
            # Done before a crash: the purge may not have happened yet (it is idempotent).
            await self._purge_markers(batch.batch_id)
            await msg.ack_sync()
            return
        wait = max(
            (
                j.send_at.ToNanoseconds() / 1e9 - time.time()
                for j in batch.jobs
                if j.HasField("send_at")
            ),
            default=0.0,
        )
        if wait > 0.5:
            await msg.nak(delay=wait)  # a scheduled send: come back when it is due
            return
        started = time.monotonic()
        # The job's trace goes on from ingest's span (the traceparent on the job record).
        with _tracer.start_as_current_span(
            f"process {names.JOBS_STREAM}",
            context=extract(msg.headers),
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "nats",
                "messaging.operation.type": "process",
                "messaging.destination.name": msg.subject,
                "messaging.consumer.group.name": names.EXPANDER_CONSUMER,
                "messaging.message.id": batch.batch_id,
            },
        ) as span:
            n = await self.expand(batch, msg.in_progress)
            await self._accepted_events(batch)
            await self._mark_done(batch.batch_id)
            await msg.ack_sync()
            span.set_attribute("sluice.pointers", n)
        log.info(
            "expanded batch=%s jobs=%d pointers=%d in %.0f ms",
            batch.batch_id,
            len(batch.jobs),
            n,
            (time.monotonic() - started) * 1000,
        )


def _due(job: messages_pb2.JobRecord) -> Timestamp:
    """When a job's messages become due: acceptance, or send_at if later."""
    if job.HasField("send_at") and job.send_at.ToNanoseconds() > job.accepted_at.ToNanoseconds():
        return job.send_at
    return job.accepted_at


async def ensure_consumer(js: JetStreamContext, cfg: Config) -> None:
    """Create the expander's consumer, or update it to this config (create-or-update)."""
    await js.add_consumer(
        names.JOBS_STREAM,
        js_api.ConsumerConfig(
            durable_name=names.EXPANDER_CONSUMER,
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=cfg.expander.ack_wait,
            max_ack_pending=10_000,
        ),
    )


async def serve(cfg: Config, stop: asyncio.Event) -> None:
    nc = await connect(cfg, "sluice-expander")
    js = nc.jetstream()
    await ensure_layout(js, cfg)
    await ensure_consumer(js, cfg)
    suppressions = Suppressions(js)
    await suppressions.start()
    lanes = Lanes(js, cfg.expander.buckets, cfg.expander.dedicated_ttl)
    await lanes.start()
    store = open_store(cfg.store, js, cfg.nats.replicas)
    expander = Expander(cfg, nc, js, store, suppressions, lanes)
    sub = await js.pull_subscribe_bind(names.EXPANDER_CONSUMER, names.JOBS_STREAM)
    health = ServiceHealth(
        "expander", lambda: nats_problems(nc, [(names.JOBS_STREAM, names.EXPANDER_CONSUMER)])
    )
    log.info("expander: running")
    try:
        await health.start(cfg.telemetry, stop)
        await consume(
            sub,
            expander.handle,
            cfg.expander.concurrency,
            stop,
            "expansion",
            retry_delay=1.0,
            drain=cfg.shutdown.drain_timeout,
        )
    finally:
        await health.close()
        await lanes.stop()
        await suppressions.stop()
        await store.close()
        await nc.close()
