"""What is written to NATS when a pointer's fate is known: its events and its dead letter.

Used by the deliverer (delivered, deferred, bounced, horizon passed) and by the scheduler's
reaper (MaxDeliver spent), so both write the same records the same way.
"""

from __future__ import annotations

import logging
import time

from nats.js import JetStreamContext
from nats.js.errors import APIError as JsApiError

from sluice import names
from sluice.telemetry import count_event, inject
from sluice.tenants import now_ts
from sluice.v1 import messages_pb2

__all__ = ["WRONG_LAST_SEQUENCE", "publish_create_only", "publish_dead_letter", "publish_event"]

log = logging.getLogger(__name__)

# JetStream: "wrong last sequence" — a create-only publish found its subject taken.
WRONG_LAST_SEQUENCE = 10071


async def publish_event(
    js: JetStreamContext,
    p: messages_pb2.DeliveryPointer,
    event_type: messages_pb2.EventType.ValueType,
    event_id: str,
    reply: messages_pb2.SmtpReply | None = None,
    category: str = "",
    mx_host: str = "",
) -> None:
    """Publish one event about p; event_id also deduplicates it (Nats-Msg-Id). The event
    carries the current trace context (the webhook POST continues it) and is counted."""
    event = messages_pb2.Event(
        event_id=event_id,
        type=event_type,
        tenant_id=p.tenant_id,
        job_id=p.job_id,
        message_id=p.message_id,
        recipient=p.recipient,
        tier=p.tier,
        timestamp=now_ts(),
        bounce_category=category,
        mx_host=mx_host,
        smtp_reply=reply,
    )
    await js.publish(
        names.event_subject(p.tenant_id, event_type, p.job_id, p.index),
        event.SerializeToString(),
        stream=names.EVENTS_STREAM,
        headers=inject({"Nats-Msg-Id": event.event_id}),
    )
    latency = None
    if event_type == messages_pb2.EVENT_TYPE_DELIVERED:
        latency = time.time() - p.accepted_at.ToNanoseconds() / 1e9
    count_event(event_type, p.tier, latency)


async def publish_dead_letter(
    js: JetStreamContext,
    p: messages_pb2.DeliveryPointer,
    reason: messages_pb2.DeadLetterReason.ValueType,
    attempts: int,
    reply: messages_pb2.SmtpReply | None = None,
) -> None:
    """Write the dead letter create-only; a repeat (after a crash) is not a duplicate."""
    record = messages_pb2.DeadLetter(
        pointer=p,
        reason=reason,
        last_reply=reply,
        dead_at=now_ts(),
        attempts=attempts,
    )
    subject = names.dlq_subject(p.tenant_id, p.delivery_id)
    if not await publish_create_only(js, subject, record.SerializeToString(), names.DLQ_STREAM):
        log.info("dead letter for %s already written", p.delivery_id)


async def publish_create_only(js: JetStreamContext, subject: str, data: bytes, stream: str) -> bool:
    """Publish to a subject that must hold one message; False if it already does (a repeat
    after a crash is then not a duplicate)."""
    try:
        await js.publish(
            subject, data, stream=stream, headers={"Nats-Expected-Last-Subject-Sequence": "0"}
        )
    except JsApiError as exc:
        if exc.err_code != WRONG_LAST_SEQUENCE:
            raise
        return False
    return True
