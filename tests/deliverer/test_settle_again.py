"""A delivered message whose settling JetStream cannot store for a while (a stream between
leaders after its node's loss) is settled again, never sent a second time: while the pointer
is in hand, its settling is tried again; once it has come back (the settling given up, or
its ack lost), the deliverer that sent it remembers and only settles it."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from deliverer.sent import Sent
from sluice import names
from sluice.nats_layout import connect, ensure_layout
from tests.api import call
from tests.conftest import Stack, wait_for
from tests.servers import ScriptedSmtp


@pytest.fixture
def stack_overrides(smtp: tuple[ScriptedSmtp, int]) -> dict[str, dict[str, Any]]:
    return {
        "dns": {"routes": [f"slow.test=127.0.0.1:{smtp[1]}"]},
        # A pointer let go comes back after ack_wait.
        "deliverer": {"ack_wait": "4s"},
    }


@pytest.fixture
def stack_services() -> tuple[str, ...]:
    return ("ingest", "expander", "scheduler", "deliverer")  # (webhooks read EVENTS)


async def _deliver_without_events(
    stack: Stack, caplog: pytest.LogCaptureFixture, until: str
) -> None:
    """Send one message; while its DATA is answered, the EVENTS stream goes away (the
    delivered event cannot be stored, so neither is the ack that follows it) and comes back
    once the deliverer has logged `until`. Then the message must be delivered, settled and
    acknowledged, and have reached the server exactly once."""
    stack.smtp.data_delay["slow.test"] = 2.0  # (the stream is gone before DATA is answered)
    status, body, _ = await call(
        stack,
        "POST",
        "/v1/send",
        {"from": {"email": "a@acme.test"}, "to": [{"email": "x@slow.test"}], "text": "hi"},
    )
    assert status == 202, body
    await wait_for(lambda: stack.smtp.rcpt_attempts["x@slow.test"], what="the transaction")
    nc = await connect(stack.cfg, "test")
    try:
        js = nc.jetstream()
        await js.delete_stream(names.EVENTS_STREAM)
        await wait_for(lambda: stack.smtp.to("x@slow.test"), what="the message at the server")
        await wait_for(lambda: until in caplog.text, 20, f"the deliverer to log {until!r}")
        await ensure_layout(js, stack.cfg)

        async def delivered() -> list[Any]:
            status, got, _ = await call(stack, "GET", f"/v1/messages/{body['message_id']}")
            if status == 404:  # (its accepted event went with the stream)
                return []
            assert status == 200, got
            events = [e for e in got.get("events", []) if e["type"] == "delivered"]
            return events if got["state"] == "delivered" else []

        await wait_for(delivered, 20, "the delivered event, once the stream is back")

        async def acked() -> bool:
            return (await js.stream_info(names.MAIL_STREAM)).state.messages == 0

        # Acknowledged: the pointer is gone from MAIL (interest retention), so it cannot
        # come back and be sent again.
        await wait_for(acked, 20, "the pointer acknowledged")
        assert len(await delivered()) == 1
    finally:
        await nc.close()
    assert len(stack.smtp.to("x@slow.test")) == 1


async def test_a_settling_not_stored_is_tried_again_while_the_pointer_is_in_hand(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    await _deliver_without_events(stack, caplog, "settling not stored (trying again")


async def test_a_delivered_pointer_that_comes_back_is_settled_not_sent_again(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    # The stream stays away until the deliverer has given the settling up: the pointer
    # comes back after ack_wait, to the deliverer that sent it.
    caplog.set_level(logging.INFO, logger="deliverer.worker")
    await _deliver_without_events(stack, caplog, "settling failed (the pointer comes back)")
    assert "delivered before delivery=" in caplog.text


def test_sent_keeps_the_latest_ids_for_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("deliverer.sent.time.monotonic", lambda: now[0])
    sent: Sent[int] = Sent(keep=10.0, most=2)
    sent.add("a", 1)
    sent.add("b", 2)
    sent.add("a", 3)  # (again: now the latest)
    sent.add("c", 4)  # one too many: the oldest, b, goes
    assert (sent.get("a"), sent.get("b"), sent.get("c"), len(sent)) == (3, None, 4, 2)
    now[0] += 10.0
    assert sent.get("a") is None  # kept 10 s, no longer
    sent.add("d", 5)  # (and the expired go as the next comes)
    assert len(sent) == 1 and sent.get("d") == 5
