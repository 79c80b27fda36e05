"""Dead letters: list, inspect and replay them (the ingest API and `sluice dlq` use this).

A dead letter lives on sluice.dlq.<tenant>.<delivery_id> (one message per subject, written
create-only). Replaying queues the pointer again with a fresh acceptance time — a new retry
horizon — and then deletes the dead letter, so that if it fails again it can be
dead-lettered again.
"""

from __future__ import annotations

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from sluice import names
from sluice.tenants import now_ts
from sluice.v1 import messages_pb2

__all__ = ["get", "list_page", "read_page", "replay"]


async def list_page(
    js: JetStreamContext, tenant_id: str | None, page_size: int, after_seq: int = 0
) -> tuple[list[tuple[int, str, messages_pb2.DeadLetter]], int]:
    """Up to page_size (stream sequence, delivery id, dead letter), oldest first, after
    after_seq; and the sequence to continue after (0 when there is no more)."""
    subject = f"sluice.dlq.{tenant_id}.>" if tenant_id else names.DLQ_SUBJECTS
    msgs, next_seq = await read_page(js, subject, page_size, after_seq)
    return [
        (
            m.metadata.sequence.stream,
            m.subject.rsplit(".", 1)[1],
            messages_pb2.DeadLetter.FromString(m.data),
        )
        for m in msgs
    ], next_seq


async def read_page(
    js: JetStreamContext, subject: str, page_size: int, after_seq: int = 0
) -> tuple[list[Msg], int]:
    """Up to page_size messages of the DLQ stream on `subject`, oldest first, after
    after_seq; and the sequence to continue after (0 when there is no more). Read with a
    throwaway consumer, deleted afterwards."""
    config = js_api.ConsumerConfig(
        ack_policy=js_api.AckPolicy.NONE,
        inactive_threshold=30.0,
        mem_storage=True,
        deliver_policy=(
            js_api.DeliverPolicy.BY_START_SEQUENCE if after_seq else js_api.DeliverPolicy.ALL
        ),
        opt_start_seq=after_seq + 1 if after_seq else None,
        num_replicas=1,
    )
    sub = await js.pull_subscribe(subject, stream=names.DLQ_STREAM, config=config)
    try:
        info = await sub.consumer_info()
        pending = info.num_pending or 0
        out: list[Msg] = []
        while pending > 0 and len(out) < page_size:
            msgs = await sub.fetch(min(page_size - len(out), pending), timeout=5.0)
            pending -= len(msgs)
            out += msgs
        more = pending > 0
        return out, (out[-1].metadata.sequence.stream if out and more else 0)
    finally:
        await sub.unsubscribe()
        try:
            await js.delete_consumer(names.DLQ_STREAM, info.name)
        except Exception:  # inactive_threshold removes it anyway
            pass


async def get(
    js: JetStreamContext, tenant_id: str, delivery_id: str
) -> tuple[int, messages_pb2.DeadLetter] | None:
    try:
        raw = await js.get_last_msg(names.DLQ_STREAM, names.dlq_subject(tenant_id, delivery_id))
    except NotFoundError:
        return None
    assert raw.seq is not None
    return raw.seq, messages_pb2.DeadLetter.FromString(raw.data or b"")


async def replay(js: JetStreamContext, tenant_id: str, delivery_id: str) -> bool:
    """Queue the dead letter again; False if there is none."""
    found = await get(js, tenant_id, delivery_id)
    if found is None:
        return False
    seq, dead = found
    pointer = messages_pb2.DeliveryPointer()
    pointer.CopyFrom(dead.pointer)
    pointer.accepted_at.CopyFrom(now_ts())
    pointer.ClearField("expires_at")
    # A replay is one message: a hash-bucket lane (the scheduler finds every lane).
    key = names.domain_key(pointer.domain)
    await js.publish(
        names.mail_subject(pointer.tier, names.bucket_lane(key, 16), key, pointer.tenant_id),
        pointer.SerializeToString(),
        stream=names.MAIL_STREAM,
        headers={"Nats-Msg-Id": f"replay-{delivery_id}-{seq}"},
    )
    await js.delete_msg(names.DLQ_STREAM, seq)
    return True
