"""A delivered message whose settling JetStream cannot store for a moment (a stream between
leaders after its node's loss) is settled again, not let go and sent a second time."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sluice import names
from sluice.nats_layout import connect, ensure_layout
from tests.api import call
from tests.conftest import Stack, wait_for
from tests.servers import ScriptedSmtp


@pytest.fixture
def stack_overrides(smtp: tuple[ScriptedSmtp, int]) -> dict[str, dict[str, Any]]:
    return {
        "dns": {"routes": [f"slow.test=127.0.0.1:{smtp[1]}"]},
        # A pointer let go comes back after ack_wait: 6 s, so that this test sees it.
        "deliverer": {"ack_wait": "6s"},
    }


@pytest.fixture
def stack_services() -> tuple[str, ...]:
    return ("ingest", "expander", "scheduler", "deliverer")  # (webhooks read EVENTS)


async def test_a_delivery_whose_event_is_not_stored_for_a_while_is_not_sent_again(
    stack: Stack,
) -> None:
    stack.smtp.data_delay["slow.test"] = 1.0
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
        # The EVENTS stream goes away while DATA is answered: the delivered event cannot
        # be stored, so neither is the ack that follows it.
        await js.delete_stream(names.EVENTS_STREAM)
        await wait_for(lambda: stack.smtp.to("x@slow.test"), what="the message at the server")
        await asyncio.sleep(1.0)  # (the deliverer's settling meets no stream meanwhile)
        await ensure_layout(js, stack.cfg)

        async def delivered() -> bool:
            status, got, _ = await call(stack, "GET", f"/v1/messages/{body['message_id']}")
            return status == 200 and got["state"] == "delivered"

        await wait_for(delivered, 20, "the delivered event, once the stream is back")

        async def acked() -> bool:
            return (await js.stream_info(names.MAIL_STREAM)).state.messages == 0

        # Acknowledged: the pointer is gone from MAIL (interest retention), so it cannot
        # come back and be sent again.
        await wait_for(acked, 20, "the pointer acknowledged")
    finally:
        await nc.close()
    assert len(stack.smtp.to("x@slow.test")) == 1
