"""The deliverer's SMTP seam (deliverer/smtp.py, over aiosmtplib) against a real aiosmtpd
server, with PIPELINING offered and not: per-recipient replies in one transaction, refused
senders and recipients, a server leaving with 421, RSET only after an aborted transaction,
dot-stuffing, on asyncio and on uvloop (what the services run). And against a server that
answers an envelope only once it has all of it, which only a pipelining client gets through.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvloop

from deliverer.smtp import ConnectionLost, SmtpConnection
from tests.servers import ScriptedSmtp, self_signed_context, start_smtp


@pytest.fixture(params=[True, False], ids=["pipelining", "no-pipelining"])
async def server(request: pytest.FixtureRequest) -> AsyncIterator[tuple[ScriptedSmtp, int]]:
    handler = ScriptedSmtp(pipelining=request.param)
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
    # Left without QUIT: with DATA sent along (pipelined), QUIT would have been read as the
    # message, and waited for until the command timeout cut the connection.
    assert not conn._late
    with pytest.raises(ConnectionLost):
        await conn.send("from@y.test", "d@x.test", MESSAGE)
    await conn.close()
    assert smtp.active == 0, "close returned before the server saw the connection end"


async def test_close_returns_once_the_server_has_seen_the_end(
    server: tuple[ScriptedSmtp, int],
) -> None:
    """A site's server counts a connection until it has seen its end: a connection opened
    at once after `close` (the next one of a lease) must not be counted beside it."""
    smtp, port = server
    for _ in range(3):
        conn = await _open(port)
        assert (await conn.send("from@y.test", "a@x.test", MESSAGE)).code == 250
        await conn.close()
        assert smtp.active == 0
    assert smtp.max_active == 1


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


def test_the_same_on_uvloop(tmp_path: Path) -> None:
    """The services run on uvloop, whose transports are not asyncio's classes; the
    connection's replies are handed to our reader after STARTTLS too."""

    async def run() -> None:
        for tls in (None, self_signed_context(tmp_path)):
            handler = ScriptedSmtp()
            srv, port = await start_smtp(handler, tls)
            try:
                await test_each_recipient_gets_its_deciding_reply((handler, port))
                assert all(r.tls for r in handler.received) == (tls is not None)
            finally:
                srv.close()
                await srv.wait_closed()

    uvloop.run(run())


@dataclass
class EnvelopeAtOnce:
    """A raw SMTP server that offers PIPELINING and answers MAIL, RCPT and DATA only once
    DATA has come, all in one write: a client that waits for each reply before the next
    command never gets one. RCPTs to "no*" are refused; with `always_354` DATA is accepted
    even then (RFC 2920 says a server should not)."""

    always_354: bool = False
    garbage: bool = False  # answer the envelope with something that is no SMTP reply
    messages: list[bytes] = field(default_factory=list)
    rsets: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mx.test ESMTP\r\n")
        pending: list[bytes] = []
        accepted = 0
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-mx.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            elif verb == b"MAIL":
                pending.append(b"250 2.1.0 ok\r\n")
            elif verb == b"RCPT":
                refused = line[9:11].lower() == b"no"
                accepted += not refused
                pending.append(b"550 5.1.1 no such user\r\n" if refused else b"250 2.1.5 ok\r\n")
            elif verb == b"DATA":
                go = accepted or self.always_354
                pending.append(b"354 go on\r\n" if go else b"554 5.5.1 no valid recipients\r\n")
                writer.write(b"garbage\r\n" if self.garbage else b"".join(pending))
                pending, accepted = [], 0
                if go:
                    body = b""
                    while (chunk := await reader.readline()) not in (b".\r\n", b""):
                        body += chunk[1:] if chunk.startswith(b".") else chunk  # unstuffed
                    self.messages.append(body)
                    writer.write(b"250 2.0.0 queued\r\n")
            elif verb == b"RSET":
                self.rsets += 1
                writer.write(b"250 2.0.0 ok\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 bye\r\n")
                break
        writer.close()


async def _envelope_at_once(handler: EnvelopeAtOnce) -> tuple[asyncio.Server, int]:
    srv = await asyncio.start_server(handler.handle, "127.0.0.1", 0)
    return srv, int(srv.sockets[0].getsockname()[1])


async def test_a_pipelined_envelope_is_answered_at_once() -> None:
    handler = EnvelopeAtOnce()
    srv, port = await _envelope_at_once(handler)
    # A command timeout of 1 s: waiting for MAIL's reply alone would be cut.
    conn = SmtpConnection("mx.test", "127.0.0.1", port, "deliverer.test", 5.0, 1.0)
    try:
        await conn.open()
        replies = await conn.send_many("f@y.test", ["a@x.test", "nob@x.test", "c@x.test"], MESSAGE)
        assert {r: v.code for r, v in replies.items()} == {
            "a@x.test": 250,
            "nob@x.test": 550,
            "c@x.test": 250,
        }
        assert (await conn.send("f@y.test", "d@x.test", b"Subject: 2\r\n\r\nx\r\n")).code == 250
        assert handler.messages == [MESSAGE, b"Subject: 2\r\n\r\nx\r\n"]
        # Every recipient refused: DATA was refused too, and the transaction is reset.
        replies = await conn.send_many("f@y.test", ["noa@x.test", "nob@x.test"], MESSAGE)
        assert [v.code for v in replies.values()] == [550, 550] and handler.rsets == 1
        assert conn.usable and conn.deliveries == 2
    finally:
        await conn.close()
        srv.close()
        await srv.wait_closed()


async def test_data_accepted_without_recipients_sends_nothing() -> None:
    """RFC 2920 3.1: if DATA is accepted although every RCPT was refused, the client sends
    the lone "." (an empty message the server must not deliver) and resets."""
    handler = EnvelopeAtOnce(always_354=True)
    srv, port = await _envelope_at_once(handler)
    conn = SmtpConnection("mx.test", "127.0.0.1", port, "deliverer.test", 5.0, 1.0)
    try:
        await conn.open()
        replies = await conn.send_many("f@y.test", ["noa@x.test"], MESSAGE)
        assert replies["noa@x.test"].code == 550
        assert handler.messages == [b""] and handler.rsets == 1
        assert (await conn.send("f@y.test", "a@x.test", MESSAGE)).code == 250
        assert handler.messages == [b"", MESSAGE]
    finally:
        await conn.close()
        srv.close()
        await srv.wait_closed()


async def test_what_is_no_smtp_reply_breaks_the_connection() -> None:
    srv, port = await _envelope_at_once(EnvelopeAtOnce(garbage=True))
    conn = SmtpConnection("mx.test", "127.0.0.1", port, "deliverer.test", 5.0, 1.0)
    try:
        await conn.open()
        with pytest.raises(ConnectionLost, match="malformed reply b'garbage"):
            await conn.send("f@y.test", "a@x.test", MESSAGE)
        assert not conn.usable
    finally:
        await conn.close()
        srv.close()
        await srv.wait_closed()


@dataclass
class HeldEnd:
    """A raw SMTP server that holds its reply to the end of each message for `hold`
    seconds and notes when each command line arrived, read as it comes (so a command sent
    before the reply it should wait for is seen early)."""

    pipelining: bool
    hold: float = 0.5
    arrivals: list[tuple[float, bytes]] = field(default_factory=list)
    ends_answered: list[float] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lines: asyncio.Queue[bytes] = asyncio.Queue()

        async def read() -> None:
            while line := await reader.readline():
                self.arrivals.append((time.monotonic(), line))
                lines.put_nowait(line)
            lines.put_nowait(b"")

        reading = asyncio.ensure_future(read())
        writer.write(b"220 mx.test ESMTP\r\n")
        extensions = b"250-PIPELINING\r\n" if self.pipelining else b""
        while line := await lines.get():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-mx.test\r\n" + extensions + b"250 8BITMIME\r\n")
            elif verb in (b"MAIL", b"RCPT"):
                writer.write(b"250 ok\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go on\r\n")
                body = b""
                while (chunk := await lines.get()) not in (b".\r\n", b""):
                    body += chunk
                self.messages.append(body)
                await asyncio.sleep(self.hold)
                self.ends_answered.append(time.monotonic())
                writer.write(b"250 2.0.0 queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
        reading.cancel()
        writer.close()


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "no-pipelining"])
async def test_the_next_envelope_goes_with_the_end_only_when_pipelining(pipelining: bool) -> None:
    """RFC 2920 3.1: a message's end may be followed at once by the next MAIL, RCPT and
    DATA; without PIPELINING the next MAIL waits for the reply to the end."""
    handler = HeldEnd(pipelining)
    srv = await asyncio.start_server(handler.handle, "127.0.0.1", 0)
    port = int(srv.sockets[0].getsockname()[1])
    conn = SmtpConnection("mx.test", "127.0.0.1", port, "deliverer.test", 5.0, 5.0)
    try:
        await conn.open()
        first = await conn.submit("f@y.test", ["a@x.test"], b"Subject: 1\r\n\r\none\r\n")
        second = await conn.submit("f@y.test", ["b@x.test"], b"Subject: 2\r\n\r\ntwo\r\n")
        assert (await first)["a@x.test"].code == 250
        assert (await second)["b@x.test"].code == 250
        assert handler.messages == [b"Subject: 1\r\n\r\none\r\n", b"Subject: 2\r\n\r\ntwo\r\n"]
        assert conn.transactions == 2 and conn.deliveries == 2
    finally:
        await conn.close()
        srv.close()
        await srv.wait_closed()
    mails = [t for t, line in handler.arrivals if line.startswith(b"MAIL")]
    assert len(mails) == 2
    # The second MAIL came while the first message's end was held, or only after it.
    assert (mails[1] < handler.ends_answered[0]) == pipelining


async def test_a_421_at_the_end_leaves_the_next_message_to_its_own_reply(
    server: tuple[ScriptedSmtp, int],
) -> None:
    """The next message may be sent before a 421 at the end of the last one comes: the
    connection takes no transaction more, but the message already sent gets its own reply
    (cutting the connection then would make a delivered message look undelivered)."""
    smtp, port = server
    conn = await _open(port)
    smtp.data_script.append("421 4.3.2 Shutting down")
    first = await conn.submit("from@y.test", ["a@x.test"], MESSAGE)
    if smtp.pipelining:
        second = await conn.submit("from@y.test", ["b@x.test"], MESSAGE)
        assert (await first)["a@x.test"].code == 421
        # (aiosmtpd stays after a 421 of its handler: the second message is taken)
        assert (await second)["b@x.test"].code == 250
        assert [r.rcpt_tos for r in smtp.received] == [["b@x.test"]]
    else:  # the next MAIL waits for the end's reply, which says the server is leaving
        with pytest.raises(ConnectionLost, match="leaving"):
            await conn.submit("from@y.test", ["b@x.test"], MESSAGE)
        assert (await first)["a@x.test"].code == 421
        assert not smtp.received
    assert not conn.usable
    with pytest.raises(ConnectionLost, match="leaving"):
        await conn.submit("from@y.test", ["c@x.test"], MESSAGE)
    await conn.close()


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "no-pipelining"])
async def test_a_slow_end_has_the_end_of_datas_time_and_close_waits_for_it(
    pipelining: bool,
) -> None:
    """The end of a message may take the end of DATA's timeout (here 3 s) although the
    command timeout is 0.3 s: the next message's MAIL, whose reply comes after it, and
    QUIT wait that long too, so a message the server took is never cut off as lost."""
    handler = HeldEnd(pipelining, hold=1.0)
    srv = await asyncio.start_server(handler.handle, "127.0.0.1", 0)
    port = int(srv.sockets[0].getsockname()[1])
    conn = SmtpConnection("mx.test", "127.0.0.1", port, "deliverer.test", 5.0, 0.3, False, 3.0)
    try:
        await conn.open()
        first = await conn.submit("f@y.test", ["a@x.test"], b"Subject: 1\r\n\r\none\r\n")
        second = await conn.submit("f@y.test", ["b@x.test"], b"Subject: 2\r\n\r\ntwo\r\n")
        ends = asyncio.gather(first, second)
        await conn.close()  # (right after the second message: its end is still held)
        assert [r.popitem()[1].code for r in await ends] == [250, 250]
        assert not conn._late and len(handler.messages) == 2
    finally:
        srv.close()
        await srv.wait_closed()
    [quit_at] = [t for t, line in handler.arrivals if line.startswith(b"QUIT")]
    assert quit_at >= handler.ends_answered[1]  # QUIT only once the last end was answered
