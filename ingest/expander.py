"""The expander: job records in, one DeliveryPointer per envelope recipient out.

Pointers go to sluice.mail.<tier>.<domain key>. Each carries Nats-Msg-Id = delivery id, so
a job redelivered after a crash within the dedup window does not duplicate pointers.
(Deterministic chunks with a KV checkpoint, for blasts, come with the blast API.)
"""

from __future__ import annotations

import asyncio
import logging

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import APIError as JsApiError
from nats.js.errors import NotFoundError

from sluice import names
from sluice.config import Config
from sluice.nats_layout import connect, ensure_layout
from sluice.v1 import messages_pb2

__all__ = ["expand", "serve"]

log = logging.getLogger(__name__)


def pointers(job: messages_pb2.JobRecord) -> list[tuple[str, messages_pb2.DeliveryPointer]]:
    """(subject, pointer) for each recipient of a job."""
    out = []
    for i, rcpt in enumerate(job.recipients):
        domain = rcpt.email.rpartition("@")[2].encode("idna").decode("ascii").lower()
        p = messages_pb2.DeliveryPointer(
            delivery_id=f"{job.job_id}-{i}",
            job_id=job.job_id,
            message_id=rcpt.message_id,
            tenant_id=job.tenant_id,
            tier=job.tier,
            recipient=rcpt.email,
            domain=domain,
            payload_ref=job.payload_ref,
            envelope_from=job.envelope_from,
            accepted_at=job.accepted_at,
        )
        if job.HasField("expires_at"):
            p.expires_at.CopyFrom(job.expires_at)
        out.append((names.mail_subject(job.tier, names.domain_key(domain)), p))
    return out


async def expand(js: JetStreamContext, job: messages_pb2.JobRecord) -> int:
    """Publish every pointer of job; returns how many."""
    items = pointers(job)
    for subject, p in items:
        await js.publish(
            subject,
            p.SerializeToString(),
            stream=names.MAIL_STREAM,
            headers={"Nats-Msg-Id": p.delivery_id},
        )
    return len(items)


async def ensure_consumer(js: JetStreamContext) -> None:
    try:
        await js.consumer_info(names.JOBS_STREAM, names.EXPANDER_CONSUMER)
    except NotFoundError:
        await js.add_consumer(
            names.JOBS_STREAM,
            js_api.ConsumerConfig(
                durable_name=names.EXPANDER_CONSUMER,
                ack_policy=js_api.AckPolicy.EXPLICIT,
                ack_wait=60.0,
                max_ack_pending=1000,
            ),
        )


async def serve(cfg: Config, stop: asyncio.Event) -> None:
    nc = await connect(cfg, "sluice-expander")
    js = nc.jetstream()
    await ensure_layout(js, cfg)
    await ensure_consumer(js)
    sub = await js.pull_subscribe_bind(names.EXPANDER_CONSUMER, names.JOBS_STREAM)
    log.info("expander: running")
    try:
        while not stop.is_set():
            try:
                msgs = await sub.fetch(cfg.expander.concurrency * 8, timeout=0.5)
            except (TimeoutError, NatsTimeoutError):
                continue
            except Exception as exc:
                log.warning("expander fetch failed: %r", exc)
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                try:
                    job = messages_pb2.JobRecord.FromString(msg.data)
                except Exception:
                    log.error(
                        "expander: undecodable job record, terminated (seq %s)",
                        msg.metadata.sequence.stream,
                    )
                    await msg.term()
                    continue
                try:
                    n = await expand(js, job)
                except JsApiError as exc:
                    log.warning("expander: job %s not expanded (%s); retrying", job.job_id, exc)
                    await msg.nak(delay=5.0)
                    continue
                except Exception as exc:
                    log.warning("expander: job %s not expanded (%r); retrying", job.job_id, exc)
                    await msg.nak(delay=1.0)
                    continue
                await msg.ack()
                log.info("expanded job=%s pointers=%d", job.job_id, n)
    finally:
        await nc.close()
