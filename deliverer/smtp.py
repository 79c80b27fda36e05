"""The SMTP seam: one client connection to one MX host.

The whole conversation runs over a protocol of ours (`_Wire`): the greeting, EHLO (HELO if
refused), STARTTLS when offered or required, then the transactions. aiosmtplib, which opened
connections until the sixteenth session, reads one reply per command written and drops
whatever else arrives meanwhile, so it cannot pipeline; and its opening cost 420 µs of CPU a
connection against 235 for the same exchange by hand (bench.smtp_connect), which a long tail
of small sites pays every few messages. With PIPELINING (RFC 2920) advertised, MAIL, every
RCPT and DATA go out in one write, and a message's end goes out with the next message's
envelope (`submit` returns before the end is answered): one write and one wait a message on
a busy connection, against four of each through aiosmtplib.

Each reply is awaited under a timer of its own (RFC 5321 4.5.3.2) that cuts the connection
when the reply is late: cheaper than `asyncio.wait_for` per command, which cost a quarter of
aiosmtplib's transaction. A reply becomes a `Reply` the classifier reads; a connection-level
failure becomes `ConnectionLost` (always temporary).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Awaitable
from typing import cast

import aiosmtplib
from aiosmtplib.protocol import normalize_message_line_endings

from deliverer.classify import Reply, parse_reply
from deliverer.mime import ascii_email

__all__ = ["ConnectionLost", "SmtpConnection"]

log = logging.getLogger(__name__)

# RFC 5321 4.5.3.1.5: a reply line is at most 512 octets; servers overstep it with long
# texts, so allow some room but never an unbounded buffer.
MAX_REPLY = 64 * 1024


class ConnectionLost(Exception):
    """Could not connect, or the connection broke mid-transaction."""


# Seconds a connection ended from this side waits for the server to close its side too (a
# server counts a connection against the site's limit until it has seen the end: a new one
# opened before that made it count one too many) before it is cut.
_CLOSE_WAIT = 2.0

# STARTTLS's context, made once (aiosmtplib made one per STARTTLS with
# ssl.create_default_context, which loads the system's CA certificates: a few ms each).
# Like most MTAs, MX certificates are not verified: the aim is encryption, not
# authentication (RFC 7435, opportunistic security).
_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
_TLS.check_hostname = False
_TLS.verify_mode = ssl.CERT_NONE


class _Wire(asyncio.Protocol):
    """A connection's commands and replies, from the greeting on.

    Writes are corked: what is sent in one turn of the event loop goes out in one write, so
    a message's end and the next message's envelope share a packet. Each command sent
    expects a reply: `send` gives the futures its replies resolve, in order, however many
    replies one read brings. A reply nobody expects breaks the connection. The greeting is
    the reply expected first (`greeting`)."""

    transport: asyncio.Transport

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self.greeting: asyncio.Future[aiosmtplib.SMTPResponse] = self._loop.create_future()
        self._expected: deque[asyncio.Future[aiosmtplib.SMTPResponse]] = deque([self.greeting])
        self._out: list[bytes] = []
        self.lost: ConnectionLost | None = None
        # Set once the connection is closed at both ends (connection_lost).
        self.gone: asyncio.Future[None] = self._loop.create_future()
        self._cutting: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    @property
    def buffered(self) -> bool:
        """Whether bytes of a reply not yet complete have come (none may follow the reply
        to STARTTLS: they would be taken as said over TLS, RFC 3207 6)."""
        return bool(self._buffer)

    def send(self, data: bytes, replies: int) -> list[asyncio.Future[aiosmtplib.SMTPResponse]]:
        """Write `data` (at the end of this turn of the loop) and expect `replies` replies."""
        if self.lost is not None:
            raise self.lost
        if self.transport.is_closing():
            raise ConnectionLost("connection closed")
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(data)
        futures = [self._loop.create_future() for _ in range(replies)]
        self._expected.extend(futures)
        return futures

    def _flush(self) -> None:
        if self._out and self.lost is None and not self.transport.is_closing():
            self.transport.write(self._out[0] if len(self._out) == 1 else b"".join(self._out))
        self._out.clear()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while (end := buffer.find(b"\n", start)) != -1:
            # A reply's last line has a space (or nothing) after the code, the others "-".
            if buffer[start + 3 : start + 4] != b"-":
                if not self._parse(bytes(buffer[: end + 1])):
                    return
                del buffer[: end + 1]
                start = 0
            else:
                start = end + 1
        if len(buffer) > MAX_REPLY:
            self._break(f"a reply of more than {MAX_REPLY} bytes")

    def _parse(self, reply: bytes) -> bool:
        """Hand one complete reply to the command that expects it; False (and the
        connection broken) if it is no SMTP reply, or nobody expects one."""
        lines = reply.split(b"\n")[:-1]
        try:
            code = int(lines[0][:3])
        except ValueError:
            self._break(f"malformed reply {lines[0][:80]!r}")
            return False
        text = b"\n".join(line[4:].strip(b" \t\r") for line in lines)
        response = aiosmtplib.SMTPResponse(code, text.decode("utf-8", "surrogateescape"))
        if not self._expected:
            self._break(f"a reply to no command: {code} {response.message[:80]}")
            return False
        future = self._expected.popleft()
        if not future.done():
            future.set_result(response)
        return True

    def _break(self, why: str) -> None:
        self._fail(ConnectionLost(why))
        self.transport.abort()

    def _fail(self, exc: ConnectionLost) -> None:
        if self.lost is None:
            self.lost = exc
        while self._expected:
            future = self._expected.popleft()
            if not future.done():
                future.set_exception(self.lost)
                future.exception()  # (retrieved: nobody may wait for it any more)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionLost(f"connection lost: {exc}" if exc else "connection lost"))
        if self._cutting is not None:
            self._cutting.cancel()
        if not self.gone.done():
            self.gone.set_result(None)

    def shut(self) -> None:
        """End the connection from this side, so that the server sees the end and closes
        its side too (`gone` is set then): a plain one is half-closed (TCP FIN), a TLS one
        closed (its TLS shutdown waits for the server's). Cut if that takes _CLOSE_WAIT."""
        self._fail(ConnectionLost("closed"))
        transport = self.transport
        if self._cutting is not None or self.gone.done():
            return
        self._cutting = self._loop.call_later(_CLOSE_WAIT, transport.abort)
        if transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()

    def eof_received(self) -> bool:
        self._fail(ConnectionLost("the server closed the connection"))
        return False


class SmtpConnection:
    """A connection that carries transactions until closed or broken."""

    def __init__(
        self,
        host: str,
        address: str,
        port: int,
        ehlo_name: str,
        connect_timeout: float,
        command_timeout: float,
        require_tls: bool = False,
        data_timeout: float | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.deliveries = 0
        # Domains whose mail this connection may carry, until when (the deliverer's record).
        self.serves: dict[str, float] = {}
        self._tls = False
        self._address = address
        self._ehlo_name = ehlo_name
        # STARTTLS whenever offered (opportunistic), or required for some domains (then a
        # server that does not offer it is a temporary failure).
        self._require_tls = require_tls
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        # RFC 5321 4.5.3.2: the end of DATA may take longer (10 min) than other commands.
        self._data_timeout = data_timeout or command_timeout
        self._wire: _Wire | None = None
        # The reply to the end of the last message sent, once it is expected.
        self._last: asyncio.Future[aiosmtplib.SMTPResponse] | None = None
        self._leaving = False  # (a 421 came at the end of a message)
        # Transactions begun on the connection (and deliveries: those its server took).
        self.transactions = 0
        self._pipelining = False
        self._size: int | None = None  # SIZE's limit (0: none said) if SIZE is offered
        # Set when a reply was late and the connection was cut for it: what was late.
        self._late = ""

    @property
    def usable(self) -> bool:
        wire = self._wire
        return (
            wire is not None
            and wire.lost is None
            and not wire.transport.is_closing()
            and not self._leaving
        )

    @property
    def tls(self) -> bool:
        """Whether the connection is open and encrypted (STARTTLS done)."""
        return self._tls and self.usable

    async def open(self) -> None:
        """Connect and take the greeting (within the connect timeout), EHLO (HELO if EHLO
        is refused), STARTTLS when offered or required, and EHLO again after it (RFC 3207
        4.2: the client forgets what the server said before, SIZE included)."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, wire = await loop.create_connection(_Wire, self._address, self.port)
                self._wire = wire
                greeting = await wire.greeting
        except (OSError, TimeoutError, ConnectionLost) as exc:
            self._drop()
            why = "timed out" if isinstance(exc, TimeoutError) else str(exc) or repr(exc)
            raise ConnectionLost(f"{self.host}: connect failed: {why}") from exc
        except asyncio.CancelledError:
            self._drop()
            raise
        try:
            if greeting.code != 220:
                raise ConnectionLost(f"greeting {greeting.code} {greeting.message}")
            extensions = await self._hello()
            if "starttls" in extensions:
                extensions = await self._starttls()
            elif self._require_tls:
                raise ConnectionLost("connect failed: STARTTLS extension not supported by server")
        except ConnectionLost as exc:
            self._drop()
            raise ConnectionLost(f"{self.host}: {self._late or exc}") from exc
        except BaseException:
            self._drop()
            raise
        self._pipelining = "pipelining" in extensions
        size = extensions.get("size")
        self._size = None if size is None else int(size) if size.isdigit() else 0

    async def _hello(self) -> dict[str, str]:
        """EHLO, or HELO if EHLO is refused: the extensions the server offers (none after
        HELO), by lower-case keyword."""
        wire = self._wire
        assert wire is not None
        name = self._ehlo_name.encode()
        resp = await self._reply(wire.send(b"EHLO " + name + b"\r\n", 1)[0], "EHLO")
        if resp.code == 250:
            return _extensions(resp.message)
        if resp.code != 421:
            resp = await self._reply(wire.send(b"HELO " + name + b"\r\n", 1)[0], "HELO")
            if resp.code == 250:
                return {}
        # Not about any message: try elsewhere, or later.
        raise ConnectionLost(f"HELO refused: {resp.code} {resp.message}")

    async def _starttls(self) -> dict[str, str]:
        """STARTTLS, the TLS handshake, and EHLO again: the extensions offered over TLS."""
        wire = self._wire
        assert wire is not None
        resp = await self._reply(wire.send(b"STARTTLS\r\n", 1)[0], "STARTTLS")
        if resp.code != 220:
            raise ConnectionLost(f"STARTTLS refused: {resp.code} {resp.message}")
        if wire.buffered or wire.lost is not None:
            # RFC 3207 6: what came with the reply would pass for what came over TLS (a
            # reply injected by a man in the middle; a whole one breaks the wire at once).
            raise ConnectionLost("data after the reply to STARTTLS")
        try:
            async with asyncio.timeout(self._command_timeout):
                # (no SNI, as Postfix by default and aiosmtplib before: nothing is verified)
                transport = await asyncio.get_running_loop().start_tls(wire.transport, wire, _TLS)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            why = "timed out" if isinstance(exc, TimeoutError) else str(exc) or repr(exc)
            raise ConnectionLost(f"TLS handshake failed: {why}") from exc
        if transport is None:
            raise ConnectionLost("connection lost in the TLS handshake")
        wire.transport = transport
        self._tls = True
        return await self._hello()

    async def send(self, mail_from: str, recipient: str, data: bytes) -> Reply:
        """One transaction for one recipient: the reply that decided it."""
        return (await self.send_many(mail_from, [recipient], data))[recipient]

    async def send_many(
        self, mail_from: str, recipients: list[str], data: bytes
    ) -> dict[str, Reply]:
        """One transaction for several recipients of the same message: each recipient's
        deciding reply (see `submit`)."""
        return await (await self.submit(mail_from, recipients, data))

    async def submit(
        self, mail_from: str, recipients: list[str], data: bytes
    ) -> Awaitable[dict[str, Reply]]:
        """Start a transaction for several recipients of the same message; returned once
        the message is written (or the transaction decided before that): what is returned
        gives each recipient's deciding reply, its RCPT reply if refused there, else the
        reply to DATA or to the end of the message. Meanwhile the next transaction may be
        submitted: with PIPELINING its envelope goes out with this one's end (RFC 2920 3.1),
        without it, once this one's end is answered.

        A 4xx/5xx is a reply rather than an exception; RSET follows only an aborted
        transaction. A broken connection raises ConnectionLost, here or from the result.
        """
        if self._wire is None or self._leaving:
            raise ConnectionLost(
                f"{self.host}: " + ("leaving" if self._leaving else "not connected")
            )
        limit = self._size
        if limit and len(data) > limit:
            # The server said how much it takes (SIZE, RFC 1870): do not send what it refuses.
            reply = Reply(
                552, f"5.3.4 message is {len(data)} bytes, the server takes {limit}", "5.3.4"
            )
            return _now(dict.fromkeys(recipients, reply))
        self.transactions += 1
        try:
            return await self._envelope(mail_from, recipients, data)
        except ConnectionLost as exc:
            await self.close()
            raise ConnectionLost(f"{self.host}: {self._late or exc}") from exc

    async def _envelope(
        self, mail_from: str, recipients: list[str], data: bytes
    ) -> Awaitable[dict[str, Reply]]:
        wire = self._wire
        assert wire is not None
        # The addresses were validated at ingest; ascii_email refuses what SMTP cannot carry.
        mail = b"MAIL FROM:<" + ascii_email(mail_from).encode() + b">"
        if self._size is not None:
            mail += b" SIZE=%d" % len(data)
        envelope = [mail + b"\r\n"]
        envelope += [b"RCPT TO:<" + ascii_email(r).encode() + b">\r\n" for r in recipients]
        envelope.append(b"DATA\r\n")
        for line in envelope:
            if b"\r" in line[:-2] or b"\n" in line[:-2]:
                raise ValueError(f"a line break in an SMTP command: {line!r}")
        pipelined = self._pipelining
        if pipelined:
            replies = wire.send(b"".join(envelope), len(envelope))
        else:
            if self._last is not None:  # the last message's end is answered first
                last = await self._reply(
                    self._last, "the end of DATA", self._data_timeout, shared=True
                )
                if last.code == 421:
                    self._leaving = True
                    raise ConnectionLost("leaving (421 at the end of the last message)")
            replies = wire.send(envelope[0], 1)
        # (MAIL's reply comes after the reply to the last message's end, if that is still
        # to come: it has the end of DATA's time)
        resp = await self._reply(replies[0], "MAIL", after_end=True)
        if resp.code != 250:
            refused = dict.fromkeys(recipients, parse_reply(resp.code, resp.message))
            if resp.code == 421:  # the server is leaving (no QUIT: replies may still be due)
                self._drop()
            elif pipelined:  # the RCPTs and DATA were sent all the same: their replies
                try:
                    for rcpt_reply in replies[1:-1]:
                        await self._reply(rcpt_reply, "RCPT")
                    if (await self._reply(replies[-1], "DATA")).code == 354:
                        await self._nothing()
                    await self._abort(resp.code)
                except ConnectionLost:  # (the refusal of MAIL decided all the same)
                    await self.close()
            else:
                await self._abort(resp.code)
            return _now(refused)
        decided: dict[str, Reply] = {}
        accepted = []
        for i, rcpt in enumerate(recipients):
            if not pipelined:
                replies.append(wire.send(envelope[1 + i], 1)[0])
            resp = await self._reply(replies[1 + i], "RCPT")
            if resp.code in (250, 251):
                accepted.append(rcpt)
                continue
            decided[rcpt] = parse_reply(resp.code, resp.message)
            if resp.code == 421:  # the server is leaving: the rest fail the same way (no
                self._drop()  # QUIT: DATA may have been taken, and QUIT read as the message)
                return _now({r: decided.get(r, decided[rcpt]) for r in recipients})
        if not pipelined:
            if not accepted:
                await self._abort(0)
                return _now(decided)
            replies.append(wire.send(envelope[-1], 1)[0])
        resp = await self._reply(replies[-1], "DATA")
        if not accepted:  # (pipelined) DATA went out with the RCPTs, all of them refused
            if resp.code == 354:
                await self._nothing()
            await self._abort(resp.code)
            return _now(decided)
        if resp.code != 354:
            await self._abort(resp.code)
            refusal = parse_reply(resp.code, resp.message)
            return _now({r: decided.get(r, refusal) for r in recipients})
        [end] = wire.send(_wire_data(data), 1)
        self._last = end
        return self._end(end, recipients, accepted, decided)

    async def _end(
        self,
        end: asyncio.Future[aiosmtplib.SMTPResponse],
        recipients: list[str],
        accepted: list[str],
        decided: dict[str, Reply],
    ) -> dict[str, Reply]:
        """The reply to the end of a message decides its accepted recipients."""
        try:
            resp = await self._reply(end, "the end of DATA", self._data_timeout)
        except ConnectionLost as exc:
            self._drop()
            raise ConnectionLost(f"{self.host}: {self._late or exc}") from exc
        if resp.code < 400:
            self.deliveries += 1
        elif resp.code == 421:
            # The server is leaving: no transaction more. Not cut here, though: the next
            # message may be on its way already, and its reply is the one that tells.
            self._leaving = True
        reply = parse_reply(resp.code, resp.message)
        return {r: decided.get(r, reply) for r in recipients}

    async def _reply(
        self,
        reply: asyncio.Future[aiosmtplib.SMTPResponse],
        what: str,
        seconds: float = 0.0,
        after_end: bool = False,
        shared: bool = False,
    ) -> aiosmtplib.SMTPResponse:
        """A command's reply, or the connection cut if it has not come within `seconds`
        (by default the command timeout; the end of DATA's, `after_end`, for a reply that
        comes after the last message's end while that is still to come). Then
        `ConnectionLost`, and `_late` says what was late. `shared`: a reply awaited elsewhere
        too (the last message's end), shielded from a cancel here."""
        if reply.done():  # (came with an earlier one: no timer, no wait)
            return reply.result()
        if not seconds:
            last = self._last
            pending_end = after_end and last is not None and not last.done()
            seconds = self._data_timeout if pending_end else self._command_timeout
        timer = asyncio.get_running_loop().call_later(seconds, self._cut, what, seconds)
        try:
            return await (asyncio.shield(reply) if shared else reply)
        finally:
            timer.cancel()

    async def _nothing(self) -> None:
        """DATA was accepted with no recipient accepted (RFC 2920 3.1 says a server should
        not): send the message's end alone."""
        assert self._wire is not None
        await self._reply(self._wire.send(b".\r\n", 1)[0], "the end of DATA", self._data_timeout)

    def _cut(self, what: str, seconds: float) -> None:
        if self._last is not None and not self._last.done():  # (its reply comes first)
            what = "the end of DATA"
        self._late = f"no reply to {what} within {seconds:g} s"
        log.info("%s: %s: closing the connection", self.host, self._late)
        if self._wire is not None:
            self._wire.transport.abort()

    async def _abort(self, code: int) -> None:
        """End an aborted transaction: RSET, or close after 421 (the server is leaving)."""
        if code == 421:
            self._drop()
            return
        assert self._wire is not None
        await self._reply(self._wire.send(b"RSET\r\n", 1)[0], "RSET")

    def _drop(self) -> None:
        """End the connection without QUIT (it broke, or the server is leaving); `close`
        waits for the server to have closed its side too."""
        wire = self._wire
        if wire is not None and getattr(wire, "transport", None) is not None:
            wire.shut()

    async def close(self) -> None:
        """Close: once the last message's end is answered (its reply decides it: cutting
        the connection before would make a message the server took look lost, and without
        PIPELINING no command may go before it), QUIT and its reply within the command
        timeout; then the server's end of the connection (at most _CLOSE_WAIT). Until the
        server has seen the end it counts the connection against the site's limit: a new
        one opened at once made it count one too many."""
        wire = self._wire
        try:
            if self._last is not None and not self._last.done() and wire is not None:
                await self._reply(self._last, "the end of DATA", self._data_timeout, shared=True)
            if wire is not None and wire.lost is None and not wire.transport.is_closing():
                await self._reply(wire.send(b"QUIT\r\n", 1)[0], "QUIT")
        except ConnectionLost:
            pass
        finally:
            self._drop()
        if wire is not None and getattr(wire, "transport", None) is not None:
            await asyncio.shield(wire.gone)


def _extensions(ehlo: str) -> dict[str, str]:
    """The service extensions of an EHLO reply (RFC 5321 4.1.1.1): its lines after the
    first, each a keyword and its parameters, by lower-case keyword."""
    offered = {}
    for line in ehlo.split("\n")[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            offered[keyword.lower()] = params.strip()
    return offered


async def _now(replies: dict[str, Reply]) -> dict[str, Reply]:
    """A transaction decided before its message was sent."""
    return replies


def _wire_data(message: bytes) -> bytes:
    """The message as DATA carries it (RFC 5321 4.1.1.4, 4.5.2): CRLF line ends, a dot
    doubled at the start of a line, a final CRLF, and the ending "." line. A byte replace
    when its line ends are all CRLF already (as the MIME builder and the DKIM signer make
    them), normalised otherwise."""
    crlf = message.count(b"\r\n")
    if message.count(b"\n") != crlf or message.count(b"\r") != crlf:
        message = normalize_message_line_endings(message)  # (lone CR or LF: rare)
    elif not message.endswith(b"\r\n"):
        message += b"\r\n"
    message = message.replace(b"\r\n.", b"\r\n..")
    if message.startswith(b"."):
        message = b"." + message
    return message + b".\r\n"
