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


async def test_a_message_goes_as_data_carries_it(server: tuple[ScriptedSmtp, int]) -> None:
    """Line ends made CRLF (a lone LF or CR too), a dot doubled at the start of any line
    (the first included), a final line end added: the server undoes the stuffing."""
    smtp, port = server
    conn = await _open(port)
    sent = [
        (b".first\r\n.second\r\nend", b".first\r\n.second\r\nend\r\n"),
        (b"Subject: lf\n\n.dot\nbare cr\rend\n", b"Subject: lf\r\n\r\n.dot\r\nbare cr\r\nend\r\n"),
        (b"Subject: ok\r\n\r\n.\r\n..\r\n", b"Subject: ok\r\n\r\n.\r\n..\r\n"),
    ]
    for data, _ in sent:
        assert (await conn.send("from@y.test", "a@x.test", data)).code == 250
    assert [r.data for r in smtp.received] == [arrived for _, arrived in sent]
    await conn.close()


async def test_the_reply_to_the_end_of_data_decides(server: tuple[ScriptedSmtp, int]) -> None:
    """A refusal at the end of DATA is the recipients' reply and ends the transaction (no
    RSET, the connection goes on); a 421 there closes the connection."""
    smtp, port = server
    conn = await _open(port)
    smtp.data_script += ["554 5.7.1 Message refused as spam", "452 4.3.1 Out of storage"]
    replies = await conn.send_many("from@y.test", ["a@x.test", "b@x.test"], MESSAGE)
    assert {r: (v.code, v.enhanced) for r, v in replies.items()} == {
        "a@x.test": (554, "5.7.1"),
        "b@x.test": (554, "5.7.1"),
    }
    reply = await conn.send("from@y.test", "c@x.test", MESSAGE)
    assert (reply.code, reply.enhanced) == (452, "4.3.1")
    assert conn.usable and conn.deliveries == 0 and smtp.rsets == 0 and not smtp.received
    reply = await conn.send("from@y.test", "d@x.test", MESSAGE)
    assert reply.code == 250 and conn.deliveries == 1
    smtp.data_script.append("421 4.3.2 Shutting down")
    reply = await conn.send("from@y.test", "e@x.test", MESSAGE)
    assert reply.code == 421 and not conn.usable
    assert [r.rcpt_tos for r in smtp.received] == [["d@x.test"]]


async def test_a_late_reply_cuts_the_connection(server: tuple[ScriptedSmtp, int]) -> None:
    """RFC 5321 4.5.3.2: a command's reply has `command_timeout`, the end of DATA has
    `data_timeout`; a late one is a lost connection that says what was late."""
    smtp, port = server
    smtp.rcpt_delay["slowrcpt.test"] = 2.0
    smtp.data_delay["slowdata.test"] = 2.0
    conn = SmtpConnection("mx.test", "127.0.0.1", port, "deliverer.test", 5.0, 0.3, False, 0.8)
    await conn.open()
    with pytest.raises(ConnectionLost, match=r"no reply to RCPT within 0\.3 s"):
        await conn.send("from@y.test", "a@slowrcpt.test", MESSAGE)
    assert not conn.usable
    conn = SmtpConnection("mx.test", "127.0.0.1", port, "deliverer.test", 5.0, 0.3, False, 0.8)
    await conn.open()
    # A DATA that takes 0.5 s is within the 0.8 s for the end of DATA (not the 0.3 s).
    smtp.data_delay["fine.test"] = 0.5
    assert (await conn.send("from@y.test", "b@fine.test", MESSAGE)).code == 250
    with pytest.raises(ConnectionLost, match=r"no reply to the end of DATA within 0\.8 s"):
        await conn.send("from@y.test", "c@slowdata.test", MESSAGE)
    assert not conn.usable


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
