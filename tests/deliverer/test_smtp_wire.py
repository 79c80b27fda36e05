"""The deliverer's SMTP seam (deliverer/smtp.py, over aiosmtplib) against a real aiosmtpd
server: per-recipient replies in one transaction, refused senders and recipients, a server
leaving with 421, RSET only after an aborted transaction, dot-stuffing, on asyncio and on
uvloop (what the services run)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import uvloop

from deliverer.smtp import ConnectionLost, SmtpConnection
from tests.servers import ScriptedSmtp, start_smtp


@pytest.fixture
async def server() -> AsyncIterator[tuple[ScriptedSmtp, int]]:
    handler = ScriptedSmtp()
    srv, port = await start_smtp(handler)
    yield handler, port
    srv.close()
    await srv.wait_closed()


async def _open(port: int) -> SmtpConnection:
    conn = SmtpConnection("mx.test", "127.0.0.1", port, "deliverer.test", 5.0, 5.0)
    await conn.open()
    return conn


MESSAGE = b"Subject: hi\r\n\r\n.a line starting with a dot\r\nbody\r\n..two dots\r\n"


async def test_each_recipient_gets_its_deciding_reply(server: tuple[ScriptedSmtp, int]) -> None:
    smtp, port = server
    smtp.script["busy@x.test"] = ["450 4.2.1 Mailbox busy"]
    smtp.script["gone@x.test"] = ["550 5.1.1 No such user"]
    conn = await _open(port)
    rcpts = ["ok1@x.test", "busy@x.test", "gone@x.test", "ok2@x.test"]
    replies = await conn.send_many("from@y.test", rcpts, MESSAGE)
    assert {r: (v.code, v.enhanced) for r, v in replies.items()} == {
        "ok1@x.test": (250, "2.0.0"),
        "busy@x.test": (450, "4.2.1"),
        "gone@x.test": (550, "5.1.1"),
        "ok2@x.test": (250, "2.0.0"),
    }
    [got] = smtp.received
    assert got.rcpt_tos == ["ok1@x.test", "ok2@x.test"]
    # Dot-stuffing is undone by the server: the message arrives as it was given.
    assert got.data == MESSAGE
    # A completed transaction needs no RSET; the next one goes on the same connection.
    reply = await conn.send("from@y.test", "ok3@x.test", b"Subject: two\r\n\r\nbody")
    assert reply.code == 250 and conn.deliveries == 2 and conn.usable
    assert smtp.received[1].data == b"Subject: two\r\n\r\nbody\r\n"
    assert smtp.rsets == 0
    await conn.close()
    assert not conn.usable


async def test_refused_transactions_are_reset_and_the_connection_goes_on(
    server: tuple[ScriptedSmtp, int],
) -> None:
    smtp, port = server
    conn = await _open(port)
    # Every recipient refused: nothing is sent, the transaction is reset.
    smtp.script["a@x.test"] = ["550 5.1.1 No such user"]
    smtp.script["b@x.test"] = ["551 5.1.6 Moved"]
    replies = await conn.send_many("from@y.test", ["a@x.test", "b@x.test"], MESSAGE)
    assert [v.code for v in replies.values()] == [550, 551]
    # The sender refused: every recipient gets that reply.
    smtp.mail_script.append("553 5.7.1 Sender not allowed")
    replies = await conn.send_many("from@y.test", ["c@x.test", "d@x.test"], MESSAGE)
    assert {v.code for v in replies.values()} == {553}
    assert smtp.rsets == 2
    assert not smtp.received
    reply = await conn.send("from@y.test", "e@x.test", MESSAGE)
    assert reply.code == 250 and [r.rcpt_tos for r in smtp.received] == [["e@x.test"]]
    await conn.close()


async def test_a_421_closes_the_connection_and_decides_the_rest(
    server: tuple[ScriptedSmtp, int],
) -> None:
    smtp, port = server
    smtp.script["b@x.test"] = ["421 4.7.0 Too many connections, closing"]
    conn = await _open(port)
    replies = await conn.send_many("from@y.test", ["a@x.test", "b@x.test", "c@x.test"], MESSAGE)
    assert {r: v.code for r, v in replies.items()} == {
        "a@x.test": 421,
        "b@x.test": 421,
        "c@x.test": 421,
    }
    assert not conn.usable and not smtp.received
    with pytest.raises(ConnectionLost):
        await conn.send("from@y.test", "d@x.test", MESSAGE)


async def test_nobody_listening_is_connection_lost() -> None:
    srv, port = await start_smtp(ScriptedSmtp())
    srv.close()
    await srv.wait_closed()
    with pytest.raises(ConnectionLost, match=r"mx\.test: connect failed"):
        await _open(port)


def test_the_same_on_uvloop() -> None:
    """The services run on uvloop, whose transports are not asyncio's classes."""

    async def run() -> None:
        handler = ScriptedSmtp()
        srv, port = await start_smtp(handler)
        try:
            await test_each_recipient_gets_its_deciding_reply((handler, port))
        finally:
            srv.close()
            await srv.wait_closed()

    uvloop.run(run())
