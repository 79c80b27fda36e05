"""The end of the retry ladder: a message whose server keeps answering 4xx is retried on
the ladder until its tier's horizon passes (the last delay is cut to end there), then, at
the next attempt, dead-lettered (reason "expired") with a signed `message.failed` webhook,
and nothing of it is left in MAIL. The three recipients' pointers are one message's: their
dead letters go together."""

from __future__ import annotations

from typing import Any

import pytest

from sluice import names
from sluice.nats_layout import connect
from sluice.v1 import messages_pb2
from tests.conftest import Stack, wait_for
from tests.e2e.test_send import message, post

BUSY = "450 4.2.1 Mailbox busy"


@pytest.fixture
def stack_overrides() -> dict[str, dict[str, Any]]:
    return {"retry": {"ladder": ["300ms"], "jitter": 0.0, "horizon_transactional": "2s"}}


async def test_a_message_deferred_past_its_horizon_is_dead_lettered(stack: Stack) -> None:
    recipients = [f"r{i}@mail.test" for i in range(3)]
    for r in recipients:
        stack.smtp.script[r] = [BUSY] * 100
    status, body, _ = await post(
        stack,
        message(tier="transactional", to=[{"email": r} for r in recipients]),
    )
    assert status == 202, body

    failed = await wait_for(
        lambda: len(stack.hooks.of_type("message.failed")) >= 3 or None,
        timeout=30,
        what="three failed webhooks",
    )
    assert failed
    calls = stack.hooks.of_type("message.failed")
    assert sorted(c.verified["data"]["recipient"] for c in calls if c.verified) == recipients
    for r in recipients:
        assert stack.smtp.rcpt_attempts[r] >= 2, "retried on the ladder before the horizon"
    assert stack.smtp.received == []
    assert stack.hooks.of_type("message.deferred"), "each 450 was a deferral first"

    nc = await connect(stack.cfg, "test")
    try:
        js = nc.jetstream()
        for i in range(len(recipients)):
            raw = await js.get_last_msg(
                names.DLQ_STREAM, names.dlq_subject("acme", f"{body['job_id']}-{i}")
            )
            assert raw.data is not None
            dead = messages_pb2.DeadLetter.FromString(raw.data)
            assert dead.reason == messages_pb2.DEAD_LETTER_REASON_EXPIRED
            assert dead.pointer.recipient == recipients[i]
    finally:
        await nc.close()

    async def mail_empty() -> bool:
        nc = await connect(stack.cfg, "test")
        try:
            info = await nc.jetstream().stream_info(names.MAIL_STREAM)
            return info.state.messages == 0
        finally:
            await nc.close()

    assert await wait_for(mail_empty, what="MAIL drained")
