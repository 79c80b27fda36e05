"""Overload: a full JOBS backlog answers 429, a stopped NATS answers 503, both with
Retry-After, and nothing is delivered for refused requests."""

from __future__ import annotations

from typing import Any

import pytest

from tests.api import call, reason
from tests.conftest import Stack


@pytest.fixture
def stack_overrides() -> dict[str, dict[str, Any]]:
    return {"nats": {"jobs_max_bytes": 4096}}


@pytest.fixture
def stack_services() -> tuple[str, ...]:
    # No expander: jobs stay in JOBS, so the backlog fills up.
    return ("ingest",)


BODY = {
    "from": {"email": "a@acme.test"},
    "to": [{"email": "bob@mail.test"}],
    "subject": "x",
    "text": "y" * 200,
}


async def test_full_backlog_answers_429_then_nats_down_answers_503(stack: Stack) -> None:
    statuses = []
    for _ in range(40):
        status, body, headers = await call(stack, "POST", "/v1/send", BODY)
        statuses.append(status)
        if status == 429:
            assert reason(body) == "BACKLOG_FULL"
            assert int(headers["Retry-After"]) >= 1
            break
    assert statuses[0] == 202 and statuses[-1] == 429, statuses

    stack.nats.stop()
    status, body, headers = await call(stack, "POST", "/v1/send", BODY)
    assert status == 503 and reason(body) == "NOT_DURABLE"
    assert int(headers["Retry-After"]) >= 1
    assert stack.smtp.received == []
