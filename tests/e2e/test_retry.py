"""Deferred mail waits on its own ladder: it never blocks fresh mail for the same domain,
and a domain that keeps deferring never blocks other domains."""

from __future__ import annotations

from typing import Any

import pytest

from tests.api import blast
from tests.conftest import Stack, wait_for


@pytest.fixture
def stack_overrides() -> dict[str, dict[str, Any]]:
    # Deferred messages come back only after a minute: long after this test has ended.
    return {"retry": {"ladder": ["60s"]}, "ingest": {"max_blast_recipients": 1000}}


async def test_deferred_mail_does_not_block_fresh_mail_or_other_domains(stack: Stack) -> None:
    for i in range(200):
        stack.smtp.script[f"busy{i}@mail.test"] = ["450 4.2.1 Mailbox busy"]
    stack.smtp.domain_reply["other.test"] = "451 4.3.0 Temporary local problem"
    await blast(
        stack, [f"busy{i}@mail.test" for i in range(200)] + [f"x{i}@other.test" for i in range(50)]
    )
    await wait_for(
        lambda: sum(stack.smtp.rcpt_attempts[f"busy{i}@mail.test"] for i in range(200)) == 200,
        60,
        "every busy mailbox tried once and deferred",
    )
    # Fresh mail to mail.test while 200 of its own and 50 of other.test wait on the ladder.
    await blast(stack, [f"fresh{i}@mail.test" for i in range(20)])
    await wait_for(
        lambda: sum(1 for r in stack.smtp.received if r.rcpt_tos[0].startswith("fresh")) == 20,
        60,
        "the fresh messages",
    )
    assert stack.smtp.received and all(
        r.rcpt_tos[0].startswith("fresh") for r in stack.smtp.received
    )
    # The deferred ones were not retried early (their ladder step is a minute).
    assert max(stack.smtp.rcpt_attempts[f"busy{i}@mail.test"] for i in range(200)) == 1
