"""Webhook dead letters: a (event, endpoint) delivery that ran out of retries is kept on
sluice.webhook_dlq.<tenant>.<endpoint>.<event id> (stream DLQ, create-only, one per subject),
listed and replayed with `sluice dlq webhooks`. A replay queues the delivery again with a
fresh retry horizon and then deletes the dead letter."""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from sluice import names
from sluice.deadletters import read_page
from sluice.outcomes import publish_create_only
from sluice.tenants import now_ts
from sluice.v1 import messages_pb2

__all__ = ["dead_letter", "list_all", "replay"]

log = logging.getLogger(__name__)


def _subject(d: messages_pb2.WebhookDelivery) -> str:
    return names.webhook_dlq_subject(d.event.tenant_id, d.endpoint_id, d.event.event_id)


async def dead_letter(js: JetStreamContext, delivery: messages_pb2.WebhookDelivery) -> None:
    """Write it create-only: a repeat after a crash is not a duplicate."""
    await publish_create_only(
        js, _subject(delivery), delivery.SerializeToString(), names.DLQ_STREAM
    )


async def list_all(
    js: JetStreamContext, tenant_id: str, limit: int = 1000
) -> list[tuple[str, messages_pb2.WebhookDelivery]]:
    """Up to `limit` (id, delivery) of a tenant, oldest first; the id is
    "<endpoint>.<event id>" as replay takes it."""
    prefix = f"sluice.webhook_dlq.{tenant_id}."
    msgs, _ = await read_page(js, f"{prefix}>", limit)
    return [
        (m.subject.removeprefix(prefix), messages_pb2.WebhookDelivery.FromString(m.data))
        for m in msgs
    ]


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
