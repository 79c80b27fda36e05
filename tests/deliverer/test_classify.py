from __future__ import annotations

import pytest

from deliverer.classify import Bounced, Deferred, Delivered, classify, parse_reply


def test_delivered() -> None:
    assert isinstance(classify(parse_reply(250, "2.0.0 OK")), Delivered)


@pytest.mark.parametrize(
    ("code", "text", "throttled"),
    [
        (450, "4.2.1 Mailbox busy", False),
        (421, "4.7.0 Try again later, closing connection", True),
        (451, "4.7.28 Our system has detected an unusual rate of unsolicited mail", True),
        (421, "[TSS04] Messages from 1.2.3.4 temporarily deferred", True),
        (452, "4.3.1 Insufficient system storage", False),
    ],
)
def test_deferred(code: int, text: str, throttled: bool) -> None:
    outcome = classify(parse_reply(code, text))
    assert isinstance(outcome, Deferred)
    assert outcome.throttled is throttled


@pytest.mark.parametrize(
    ("code", "text", "category"),
    [
        (550, "5.1.1 User unknown", "bad_mailbox"),
        (550, "User unknown", "bad_mailbox"),
        (552, "5.2.2 Mailbox full", "mailbox_full"),
        (552, "5.3.4 Message too big", "message_too_big"),
        (554, "5.7.1 Message rejected as spam", "policy"),
        (550, "5.1.2 Bad destination system", "bad_domain"),
        (554, "Transaction failed", "other"),
    ],
)
def test_bounced(code: int, text: str, category: str) -> None:
    outcome = classify(parse_reply(code, text))
    assert isinstance(outcome, Bounced)
    assert outcome.category == category
    assert outcome.reply is not None and outcome.reply.code == code
