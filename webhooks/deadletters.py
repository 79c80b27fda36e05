"""Webhook dead letters: a (event, endpoint) delivery that ran out of retries is kept on
sluice.webhook_dlq.<tenant>.<endpoint>.<event id> (stream DLQ, create-only, one per subject),
listed and replayed with `sluice dlq webhooks`. A replay queues the delivery again with a
fresh retry horizon and then deletes the dead letter."""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import APIError as JsApiError
from nats.js.errors import NotFoundError

from sluice import names
from sluice.tenants import now_ts
from sluice.v1 import messages_pb2

__all__ = ["dead_letter", "list_all", "replay"]

log = logging.getLogger(__name__)

_WRONG_LAST_SEQUENCE = 10071


def _subject(d: messages_pb2.WebhookDelivery) -> str:
    return names.webhook_dlq_subject(d.event.tenant_id, d.endpoint_id, d.event.event_id)


async def dead_letter(js: JetStreamContext, delivery: messages_pb2.WebhookDelivery) -> None:
    """Write it create-only: a repeat after a crash is not a duplicate."""
    try:
        await js.publish(
            _subject(delivery),
            delivery.SerializeToString(),
            stream=names.DLQ_STREAM,
            headers={"Nats-Expected-Last-Subject-Sequence": "0"},
        )
    except JsApiError as exc:
        if exc.err_code != _WRONG_LAST_SEQUENCE:
            raise


async def list_all(
    js: JetStreamContext, tenant_id: str, limit: int = 1000
) -> list[tuple[str, messages_pb2.WebhookDelivery]]:
    """Up to `limit` (id, delivery) of a tenant, oldest first; the id is
    "<endpoint>.<event id>" as replay takes it."""
    prefix = f"sluice.webhook_dlq.{tenant_id}."
    sub = await js.pull_subscribe(
        f"{prefix}>",
        stream=names.DLQ_STREAM,
        config=js_api.ConsumerConfig(
            ack_policy=js_api.AckPolicy.NONE, mem_storage=True, inactive_threshold=30.0
        ),
    )
    try:
        pending = (await sub.consumer_info()).num_pending or 0
        out: list[tuple[str, messages_pb2.WebhookDelivery]] = []
        while pending > 0 and len(out) < limit:
            msgs = await sub.fetch(min(limit - len(out), pending), timeout=5.0)
            pending -= len(msgs)
            out += [
                (m.subject.removeprefix(prefix), messages_pb2.WebhookDelivery.FromString(m.data))
                for m in msgs
            ]
        return out
    finally:
        await sub.unsubscribe()


async def replay(js: JetStreamContext, tenant_id: str, dead_id: str) -> bool:
    """Queue a dead webhook delivery again; False if there is none with that id."""
    subject = f"sluice.webhook_dlq.{tenant_id}.{dead_id}"
    try:
        raw = await js.get_last_msg(names.DLQ_STREAM, subject)
    except NotFoundError:
        return False
    assert raw.seq is not None
    delivery = messages_pb2.WebhookDelivery.FromString(raw.data or b"")
    delivery.replayed_at.CopyFrom(now_ts())
    await js.publish(
        names.webhook_subject(tenant_id, delivery.endpoint_id),
        delivery.SerializeToString(),
        stream=names.WEBHOOKS_STREAM,
        headers={"Nats-Msg-Id": f"replay-{dead_id}-{raw.seq}"},
    )
    await js.delete_msg(names.DLQ_STREAM, raw.seq)
    log.info("replayed webhook dead letter %s of %s", dead_id, tenant_id)
    return True
