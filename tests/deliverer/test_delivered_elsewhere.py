"""A pointer that comes back to a deliverer after another deliverer delivered it and lost the
ack (its consumer's leader on a node that died) is acknowledged, not sent again: the
recipient's delivered event is looked for first. Here the test is the other deliverer: it
fetches the pointer, stores the delivered event, and never acks. Whether the pointer came
back to a deliverer that never had it, or to the one that deferred it before the other took
it."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from nats.js import JetStreamContext

from scheduler.backlog import Consumers, Queue, read_backlog
from sluice import names
from sluice.nats_layout import connect
from sluice.outcomes import event_message
from sluice.services import service
from sluice.v1 import messages_pb2
from tests.api import call
from tests.conftest import Stack, wait_for
from tests.servers import ScriptedSmtp


@pytest.fixture
def stack_overrides(smtp: tuple[ScriptedSmtp, int]) -> dict[str, dict[str, Any]]:
    return {
        "dns": {"routes": [f"far.test=127.0.0.1:{smtp[1]}", f"near.test=127.0.0.1:{smtp[1]}"]},
        # The pointer the test fetched and never acked comes back after ack_wait.
        "deliverer": {"ack_wait": "3s"},
        # A deferred pointer comes back after 3 s.
        "retry": {"ladder": ["3s"], "jitter": 0.0},
    }


@pytest.fixture
def stack_services() -> tuple[str, ...]:
    return ("ingest", "expander", "scheduler")  # (each test starts the deliverer)


def _start_deliverer(stack: Stack) -> None:
    stack.tasks.append(
        asyncio.create_task(service("deliverer")(stack.cfg, stack.stop), name="deliverer")
    )


async def _consumer(stack: Stack, js: JetStreamContext) -> str:
    """The consumer of the queue the mail is in (the scheduler makes a queue's consumer once
    a deliverer asks for work: found or made here the same way)."""

    async def queue_with_mail() -> Queue | None:
        queues = (await read_backlog(js)).queues
        return next((q for q, n in queues.items() if n), None)

    queue = await wait_for(queue_with_mail, 20, "the pointer in MAIL")
    return await Consumers(js, stack.cfg).ensure(queue)


async def _deliver_and_lose_the_ack(js: JetStreamContext, name: str, attempt: int) -> None:
    """Be the other deliverer: take the pointer (its `attempt`th delivery), store its
    delivered event, and never ack."""
    sub = await js.pull_subscribe_bind(name, names.MAIL_STREAM)
    [msg] = await sub.fetch(1, timeout=8)
    assert msg.metadata.num_delivered == attempt
    p = messages_pb2.DeliveryPointer.FromString(msg.data)
    assert p.recipient == "x@far.test"
    subject, data, headers = event_message(
        p, messages_pb2.EVENT_TYPE_DELIVERED, f"evt_{p.delivery_id}_delivered_1"
    )
    await js.publish(subject, data, headers=headers)
    await sub.unsubscribe()


async def _acked(js: JetStreamContext) -> bool:
    return (await js.stream_info(names.MAIL_STREAM)).state.messages == 0


async def _delivered_once(stack: Stack, message_id: str) -> None:
    status, got, _ = await call(stack, "GET", f"/v1/messages/{message_id}")
    assert status == 200, got
    assert got["state"] == "delivered"
    assert [e["type"] for e in got["events"] if e["type"] == "delivered"] == ["delivered"]


async def _send(stack: Stack, to: str) -> dict[str, Any]:
    status, body, _ = await call(
        stack,
        "POST",
        "/v1/send",
        {"from": {"email": "a@acme.test"}, "to": [{"email": to}], "text": "hi"},
    )
    assert status == 202, body
    assert isinstance(body, dict)
    return body


async def test_a_pointer_delivered_by_another_deliverer_is_acked_not_sent_again(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="deliverer.worker")
    far = await _send(stack, "x@far.test")
    nc = await connect(stack.cfg, "test")
    try:
        js = nc.jetstream()
        await _deliver_and_lose_the_ack(js, await _consumer(stack, js), attempt=1)
        # Mail that nobody delivered yet, sent with it: it must still go out.
        await _send(stack, "y@near.test")
        _start_deliverer(stack)
        await wait_for(lambda: stack.smtp.to("y@near.test"), 20, "the other message at the server")
        await wait_for(lambda: _acked(js), 20, "the pointer back after ack_wait, and acknowledged")
    finally:
        await nc.close()
    assert "delivered elsewhere before delivery=" in caplog.text
    assert stack.smtp.rcpt_attempts["x@far.test"] == 0
    await _delivered_once(stack, far["message_id"])


async def test_a_deferred_pointer_delivered_meanwhile_by_another_is_acked_not_sent_again(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    # The deliverer defers the pointer (it gave it back itself); the other deliverer takes
    # it on its next delivery, delivers it and loses the ack; it comes back to the first.
    caplog.set_level(logging.INFO, logger="deliverer.worker")
    stack.smtp.script["x@far.test"] = ["450 4.2.1 Mailbox busy"]
    _start_deliverer(stack)
    far = await _send(stack, "x@far.test")
    await wait_for(lambda: stack.smtp.rcpt_attempts["x@far.test"] == 1, 20, "the first attempt")
    nc = await connect(stack.cfg, "test")
    try:
        js = nc.jetstream()
        # (the deliverer's own pulls wait 0.1 s at most: this one, made before the deferral's
        # 3 s are up, is the oldest waiting, so the server gives the pointer to it)
        await _deliver_and_lose_the_ack(js, await _consumer(stack, js), attempt=2)
        await wait_for(lambda: _acked(js), 20, "the pointer back after ack_wait, and acknowledged")
    finally:
        await nc.close()
    assert "delivered elsewhere before delivery=" in caplog.text
    assert stack.smtp.rcpt_attempts["x@far.test"] == 1  # (the deferred attempt only)
    await _delivered_once(stack, far["message_id"])
