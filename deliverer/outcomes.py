"""What the deliverer writes to NATS about a pointer: events and dead letters."""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from nats.js.errors import APIError as JsApiError

from deliverer.classify import Reply
from sluice import names
from sluice.tenants import now_ts
from sluice.v1 import messages_pb2

__all__ = ["publish_dead_letter", "publish_event"]

log = logging.getLogger(__name__)

# JetStream: "wrong last sequence" — the create-only dead letter already exists.
_JS_WRONG_LAST_SEQUENCE = 10071


def smtp_reply(reply: Reply | None) -> messages_pb2.SmtpReply | None:
    if reply is None:
        return None
    return messages_pb2.SmtpReply(code=reply.code, enhanced_code=reply.enhanced, text=reply.text)


async def publish_event(
    js: JetStreamContext,
    p: messages_pb2.DeliveryPointer,
    event_type: messages_pb2.EventType.ValueType,
    attempt: int,
    reply: Reply | None = None,
    category: str = "",
    mx_host: str = "",
) -> None:
    token = names.event_token(event_type)
    event = messages_pb2.Event(
        event_id=f"evt_{p.delivery_id}_{token}_{attempt}",
        type=event_type,
        tenant_id=p.tenant_id,
        job_id=p.job_id,
        message_id=p.message_id,
        recipient=p.recipient,
        tier=p.tier,
        timestamp=now_ts(),
        bounce_category=category,
        mx_host=mx_host,
        smtp_reply=smtp_reply(reply),
    )
    await js.publish(
        names.event_subject(p.tenant_id, event_type, p.job_id, p.index),
        event.SerializeToString(),
        stream=names.EVENTS_STREAM,
        headers={"Nats-Msg-Id": event.event_id},
    )


async def publish_dead_letter(
    js: JetStreamContext,
    p: messages_pb2.DeliveryPointer,
    reason: messages_pb2.DeadLetterReason.ValueType,
    attempts: int,
    reply: Reply | None = None,
) -> None:
    """Write the dead letter create-only; a repeat (after a crash) is not a duplicate."""
    record = messages_pb2.DeadLetter(
        pointer=p,
        reason=reason,
        last_reply=smtp_reply(reply),
        dead_at=now_ts(),
        attempts=attempts,
    )
    try:
        await js.publish(
            names.dlq_subject(p.tenant_id, p.delivery_id),
            record.SerializeToString(),
            stream=names.DLQ_STREAM,
            headers={"Nats-Expected-Last-Subject-Sequence": "0"},
        )
    except JsApiError as exc:
        if exc.err_code != _JS_WRONG_LAST_SEQUENCE:
            raise
        log.info("dead letter for %s already written", p.delivery_id)
