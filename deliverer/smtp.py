"""The SMTP seam: one client connection to one MX host.

aiosmtplib opens the connection: the greeting, EHLO (HELO if refused), and STARTTLS when
offered or required. The transactions then run over a reply reader of ours (`_Replies`),
because aiosmtplib reads one reply per command written and drops whatever else arrives
meanwhile, so it cannot pipeline. With PIPELINING (RFC 2920) advertised, MAIL, every RCPT and
DATA go out in one write and their replies are read in turn: two writes a message instead of
four, and one wait for the envelope's replies instead of one per command.

Each reply is awaited under a timer of its own (RFC 5321 4.5.3.2) that cuts the connection
when the reply is late: cheaper than `asyncio.wait_for` per command, which cost a quarter of
aiosmtplib's transaction. A reply becomes a `Reply` the classifier reads; a connection-level
failure becomes `ConnectionLost` (always temporary).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
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


class _Replies(asyncio.Protocol):
    """The replies of a connection once its transactions begin: every complete reply is
    kept, in order, until it is read, however many arrive in one read."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._buffer = bytearray()
        self._ready: deque[aiosmtplib.SMTPResponse] = deque()
        self._waiter: asyncio.Future[aiosmtplib.SMTPResponse] | None = None
        self.lost: ConnectionLost | None = None

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
            self._fail(ConnectionLost(f"a reply of more than {MAX_REPLY} bytes"))
            self.transport.abort()
            return
        if self._ready and self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            if not waiter.done():
                waiter.set_result(self._ready.popleft())

    def _parse(self, reply: bytes) -> bool:
        """Keep one complete reply; False (and the connection cut) if it is no SMTP reply."""
        lines = reply.split(b"\n")[:-1]
        try:
            code = int(lines[0][:3])
        except ValueError:
            self._fail(ConnectionLost(f"malformed reply {lines[0][:80]!r}"))
            self.transport.abort()
            return False
        text = b"\n".join(line[4:].strip(b" \t\r") for line in lines)
        self._ready.append(aiosmtplib.SMTPResponse(code, text.decode("utf-8", "surrogateescape")))
        return True

    def _fail(self, exc: ConnectionLost) -> None:
        if self.lost is None:
            self.lost = exc
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(self.lost)
        self._waiter = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionLost(f"connection lost: {exc}" if exc else "connection lost"))

    def eof_received(self) -> bool:
        self._fail(ConnectionLost("the server closed the connection"))
        return False

    async def next(self) -> aiosmtplib.SMTPResponse:
        """The next reply not yet read."""
        if self._ready:
            return self._ready.popleft()
        if self.lost is not None:
            raise self.lost
        self._waiter = asyncio.get_running_loop().create_future()
        return await self._waiter

    @property
    def pending(self) -> bool:
        """Whether a reply is waiting to be read."""
        return bool(self._ready)


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
        self._tls = False
        self._smtp = aiosmtplib.SMTP(
            hostname=address,
            port=port,
            local_hostname=ehlo_name,
            timeout=command_timeout,
            # STARTTLS whenever offered (opportunistic), or required for some domains (then a
            # server that does not offer it is a temporary failure). Like most MTAs, MX
            # certificates are not verified: the aim is encryption, not authentication.
            start_tls=True if require_tls else None,
            validate_certs=False,
        )
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        # RFC 5321 4.5.3.2: the end of DATA may take longer (10 min) than other commands.
        self._data_timeout = data_timeout or command_timeout
        self._replies: _Replies | None = None
        self._pipelining = False
        self._size: int | None = None  # SIZE's limit (0: none said) if SIZE is offered
        # Set when a reply was late and the connection was cut for it: what was late.
        self._late = ""

    @property
    def usable(self) -> bool:
        replies = self._replies
        return replies is not None and replies.lost is None and not replies.transport.is_closing()

    @property
    def tls(self) -> bool:
        """Whether the connection is open and encrypted (STARTTLS done)."""
        return self._tls and self.usable

    async def open(self) -> None:
        """Connect, EHLO (HELO if EHLO is refused), STARTTLS when offered or required, and
        EHLO again after it."""
        try:
            await self._smtp.connect(timeout=self._connect_timeout)
            if self._smtp.is_ehlo_or_helo_needed:
                # After STARTTLS the client forgets what the server said before (RFC 3207
                # 4.2), SIZE included, until EHLO again.
                resp = await self._hello()
                if resp.code != 250:  # not about any message: try elsewhere, or later
                    raise ConnectionLost(f"{self.host}: HELO refused: {resp.code} {resp.message}")
        except aiosmtplib.SMTPResponseException as exc:
            self._smtp.close()
            raise ConnectionLost(f"{self.host}: greeting {exc.code} {exc.message}") from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            self._smtp.close()
            raise ConnectionLost(f"{self.host}: connect failed: {exc}") from exc
        except ConnectionLost:
            self._smtp.close()
            raise
        extensions = self._smtp.esmtp_extensions
        self._pipelining = "pipelining" in extensions
        self._size = int(extensions["size"] or 0) if "size" in extensions else None
        transport = cast(asyncio.Transport | None, self._smtp.transport)
        if transport is None or transport.is_closing():
            self._smtp.close()
            raise ConnectionLost(f"{self.host}: connection lost after EHLO")
        self._tls = transport.get_extra_info("ssl_object") is not None
        # From here on the replies come to our reader; aiosmtplib's part is done.
        self._replies = _Replies(transport)
        transport.set_protocol(self._replies)

    async def _hello(self) -> aiosmtplib.SMTPResponse:
        """EHLO, or HELO if EHLO is refused (as aiosmtplib's own commands do): the reply that
        decided. Connection errors propagate."""
        try:
            try:
                return await self._smtp.ehlo()
            except aiosmtplib.SMTPHeloError:
                if not self._smtp.is_connected:
                    raise
                return await self._smtp.helo()
        except aiosmtplib.SMTPResponseException as exc:
            return aiosmtplib.SMTPResponse(exc.code, exc.message)

    async def send(self, mail_from: str, recipient: str, data: bytes) -> Reply:
        """One transaction for one recipient: the reply that decided it."""
        return (await self.send_many(mail_from, [recipient], data))[recipient]

    async def send_many(
        self, mail_from: str, recipients: list[str], data: bytes
    ) -> dict[str, Reply]:
        """One transaction for several recipients of the same message: each recipient's
        deciding reply (its RCPT reply if refused there, else the reply to DATA or to the
        end of the message).

        A 4xx/5xx is returned rather than raised; RSET follows only an aborted transaction.
        """
        if self._replies is None:
            raise ConnectionLost(f"{self.host}: not connected")
        limit = self._size
        if limit and len(data) > limit:
            # The server said how much it takes (SIZE, RFC 1870): do not send what it refuses.
            reply = Reply(
                552, f"5.3.4 message is {len(data)} bytes, the server takes {limit}", "5.3.4"
            )
            return dict.fromkeys(recipients, reply)
        try:
            return await self._transaction(mail_from, recipients, data)
        except ConnectionLost as exc:
            await self.close()
            raise ConnectionLost(f"{self.host}: {self._late or exc}") from exc
        except OSError as exc:
            await self.close()
            raise ConnectionLost(f"{self.host}: {exc}") from exc

    async def _transaction(
        self, mail_from: str, recipients: list[str], data: bytes
    ) -> dict[str, Reply]:
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
            self._write(b"".join(envelope))
        else:
            self._write(envelope[0])
        resp = await self._reply("MAIL")
        if resp.code != 250:
            refused = dict.fromkeys(recipients, parse_reply(resp.code, resp.message))
            if resp.code == 421:  # the server is leaving
                await self.close()
            elif pipelined:  # the RCPTs and DATA were sent all the same: read their replies
                try:
                    await self._skip(len(recipients))
                    await self._abort(resp.code)
                except ConnectionLost:  # (the refusal of MAIL decided all the same)
                    await self.close()
            else:
                await self._abort(resp.code)
            return refused
        replies: dict[str, Reply] = {}
        accepted = []
        for i, rcpt in enumerate(recipients):
            if not pipelined:
                self._write(envelope[1 + i])
            resp = await self._reply("RCPT")
            if resp.code in (250, 251):
                accepted.append(rcpt)
                continue
            replies[rcpt] = parse_reply(resp.code, resp.message)
            if resp.code == 421:  # the server is leaving: the rest fail the same way
                await self.close()
                return {r: replies.get(r, replies[rcpt]) for r in recipients}
        if not pipelined:
            if not accepted:
                await self._abort(0)
                return replies
            self._write(envelope[-1])
        resp = await self._reply("DATA")
        if not accepted:  # (pipelined) DATA went out with the RCPTs, all of them refused
            if resp.code == 354:  # RFC 2920 3.1: a server should not, but then send nothing
                self._write(b".\r\n")
                await self._reply("the end of DATA")
            await self._abort(resp.code)
            return replies
        if resp.code == 354:
            self._write(_wire_data(data))
            resp = await self._reply("the end of DATA", self._data_timeout)
            if resp.code < 400:
                self.deliveries += 1
            elif resp.code == 421:
                await self.close()
        else:
            await self._abort(resp.code)
        reply = parse_reply(resp.code, resp.message)
        for rcpt in accepted:
            replies[rcpt] = reply
        return {r: replies[r] for r in recipients}

    def _write(self, data: bytes) -> None:
        replies = self._replies
        if replies is None or replies.lost is not None or replies.transport.is_closing():
            raise ConnectionLost(
                str(replies.lost) if replies and replies.lost else "connection lost"
            )
        replies.transport.write(data)

    async def _reply(self, what: str, seconds: float | None = None) -> aiosmtplib.SMTPResponse:
        """The next reply, or the connection cut if it has not come within `seconds` (then
        `ConnectionLost`, and `_late` says what was late)."""
        replies = self._replies
        assert replies is not None
        if replies.pending:  # (came with an earlier one: no timer, no wait)
            return await replies.next()
        seconds = seconds or self._command_timeout
        timer = asyncio.get_running_loop().call_later(seconds, self._cut, what, seconds)
        try:
            return await replies.next()
        finally:
            timer.cancel()

    async def _skip(self, rcpts: int) -> None:
        """Read the replies to a refused MAIL's pipelined RCPTs and DATA."""
        for _ in range(rcpts):
            await self._reply("RCPT")
        if (await self._reply("DATA")).code == 354:
            self._write(b".\r\n")
            await self._reply("the end of DATA")

    def _cut(self, what: str, seconds: float) -> None:
        self._late = f"no reply to {what} within {seconds:g} s"
        log.info("%s: %s: closing the connection", self.host, self._late)
        if self._replies is not None:
            self._replies.transport.abort()

    async def _abort(self, code: int) -> None:
        """End an aborted transaction: RSET, or close after 421 (the server is leaving)."""
        if code == 421:
            await self.close()
            return
        self._write(b"RSET\r\n")
        await self._reply("RSET")

    async def close(self) -> None:
        """QUIT (its reply awaited within the command timeout) and close."""
        replies = self._replies
        if replies is None:
            self._smtp.close()
            return
        if self.usable:
            try:
                replies.transport.write(b"QUIT\r\n")
                await self._reply("QUIT")
            except (ConnectionLost, OSError):
                pass
        replies.transport.close()
        self._smtp.close()  # (aiosmtplib's state: its connect lock and server state)


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
