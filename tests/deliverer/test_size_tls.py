"""SIZE (RFC 1870) after STARTTLS: RFC 3207 4.2 makes the client forget what the server said
before TLS, so the limit that counts is the one in the EHLO answer given over TLS. Checked on
the connection's first transaction, against a real aiosmtpd that offers STARTTLS and
advertises a small SIZE."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from deliverer.classify import Bounced, Delivered, classify
from deliverer.smtp import SmtpConnection
from tests.servers import ScriptedSmtp, self_signed_context, start_smtp

LIMIT = 2000


@pytest.fixture
async def small_tls_smtp(tmp_path: Path) -> AsyncIterator[tuple[ScriptedSmtp, int]]:
    handler = ScriptedSmtp()
    server, port = await start_smtp(handler, self_signed_context(tmp_path), data_size_limit=LIMIT)
    yield handler, port
    server.close()


def _message(lines: int) -> bytes:
    return b"From: a@acme.test\r\nSubject: s\r\n\r\n" + (b"x" * 70 + b"\r\n") * lines


async def _connection(port: int) -> SmtpConnection:
    conn = SmtpConnection("mx.test", "127.0.0.1", port, "deliverer.test", 5.0, 5.0)
    await conn.open()
    return conn


async def test_oversize_first_message_after_starttls_is_not_offered(
    small_tls_smtp: tuple[ScriptedSmtp, int],
) -> None:
    server, port = small_tls_smtp
    conn = await _connection(port)
    try:
        big = _message(LIMIT // 24)  # about 3 times the limit
        assert len(big) > LIMIT
        replies = await conn.send_many("a@acme.test", ["big@small.test", "big2@small.test"], big)
        assert set(replies) == {"big@small.test", "big2@small.test"}
        for reply in replies.values():
            outcome = classify(reply)
            assert isinstance(outcome, Bounced), reply
            assert outcome.category == "message_too_big", reply
            assert reply.code == 552 and reply.enhanced == "5.3.4", reply
            assert str(LIMIT) in reply.text, reply
        assert server.rcpt_attempts["big@small.test"] == 0, "an oversize message was offered"
        assert server.received == []
        # The connection stays usable: a message within SIZE goes through, encrypted, and
        # MAIL FROM declared its size.
        small = _message(2)
        reply = await conn.send("a@acme.test", "fits@small.test", small)
        assert isinstance(classify(reply), Delivered), reply
        (got,) = server.to("fits@small.test")
        assert got.tls and got.data.rstrip(b"\r\n") == small.rstrip(b"\r\n")
    finally:
        await conn.close()


async def test_fitting_first_message_after_starttls_declares_its_size(
    small_tls_smtp: tuple[ScriptedSmtp, int],
) -> None:
    server, port = small_tls_smtp
    conn = await _connection(port)
    try:
        data = _message(LIMIT // 200)
        assert len(data) < LIMIT
        reply = await conn.send("a@acme.test", "fits@small.test", data)
        assert isinstance(classify(reply), Delivered), reply
        (got,) = server.to("fits@small.test")
        assert got.tls
        assert server.mail_options == [[f"SIZE={len(data)}"]]
    finally:
        await conn.close()
