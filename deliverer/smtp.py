"""The SMTP seam: one client connection to one MX host, over aiosmtplib.

aiosmtplib exceptions are translated here: a reply becomes a `Reply` the classifier reads;
a connection-level failure becomes `ConnectionLost` (always temporary).

A transaction's commands are written through aiosmtplib with its per-command timeout off and
a timer of ours instead (`_within`): aiosmtplib waits for each reply with `asyncio.wait_for`,
which cost a quarter of the transaction's CPU; a timer that cuts the connection when the
reply is late (RFC 5321 4.5.3.2) costs almost nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

import aiosmtplib
from aiosmtplib.protocol import normalize_message_line_endings

from deliverer.classify import Reply, parse_reply
from deliverer.mime import ascii_email

__all__ = ["ConnectionLost", "SmtpConnection"]

log = logging.getLogger(__name__)


class ConnectionLost(Exception):
    """Could not connect, or the connection broke mid-transaction."""


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
        # Set when a reply was late and the connection was cut for it: what was late.
        self._late = ""

    @property
    def usable(self) -> bool:
        return self._smtp.is_connected

    @property
    def tls(self) -> bool:
        """Whether the connection is encrypted (STARTTLS done)."""
        return self._smtp.is_connected and self._smtp.get_transport_info("ssl_object") is not None

    async def open(self) -> None:
        try:
            await self._smtp.connect(timeout=self._connect_timeout)
        except aiosmtplib.SMTPResponseException as exc:
            raise ConnectionLost(f"{self.host}: greeting {exc.code} {exc.message}") from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise ConnectionLost(f"{self.host}: connect failed: {exc}") from exc

    async def send(self, mail_from: str, recipient: str, data: bytes) -> Reply:
        """One transaction for one recipient: the reply that decided it."""
        return (await self.send_many(mail_from, [recipient], data))[recipient]

    async def send_many(
        self, mail_from: str, recipients: list[str], data: bytes
    ) -> dict[str, Reply]:
        """One transaction for several recipients of the same message: each recipient's
        deciding reply (its RCPT reply if refused there, else the DATA reply).

        A 4xx/5xx is returned rather than raised; RSET follows only an aborted transaction.
        """
        replies: dict[str, Reply] = {}
        try:
            if self._smtp.is_ehlo_or_helo_needed:
                # The connection's first transaction: after STARTTLS the client forgets what
                # the server said before (RFC 3207 4.2), SIZE included, until EHLO again.
                resp = await self._hello()
                if resp.code != 250:  # not about the message: try later, elsewhere perhaps
                    await self.close()
                    raise ConnectionLost(f"{self.host}: HELO refused: {resp.code} {resp.message}")
            extensions = self._smtp.esmtp_extensions
            limit = int(extensions.get("size") or 0) if "size" in extensions else 0
            if limit and len(data) > limit:
                # The server said how much it takes (SIZE, RFC 1870): do not send what it
                # refuses.
                reply = Reply(
                    552, f"5.3.4 message is {len(data)} bytes, the server takes {limit}", "5.3.4"
                )
                return dict.fromkeys(recipients, reply)
            resp = await self._mail(mail_from, len(data) if "size" in extensions else 0)
            if resp.code != 250:
                await self._abort(resp.code)
                return dict.fromkeys(recipients, parse_reply(resp.code, resp.message))
            accepted = []
            for rcpt in recipients:
                to = ascii_email(rcpt).encode()
                resp = await self._command(b"RCPT", b"TO:<" + to + b">")
                if resp.code in (250, 251):
                    accepted.append(rcpt)
                    continue
                replies[rcpt] = parse_reply(resp.code, resp.message)
                if resp.code == 421:  # the server is closing: the rest fail the same way
                    await self.close()
                    return {r: replies.get(r, replies[rcpt]) for r in recipients}
            if not accepted:
                await self._abort(0)
                return replies
            resp = await self._data(data)
            reply = parse_reply(resp.code, resp.message)
            if resp.code == 421:
                await self.close()
            elif resp.code < 400:
                self.deliveries += 1
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as exc:
            await self.close()
            raise ConnectionLost(f"{self.host}: {self._late or exc}") from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            await self.close()
            raise ConnectionLost(f"{self.host}: {exc}") from exc
        for rcpt in accepted:
            replies[rcpt] = reply
        return replies

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

    async def _mail(self, mail_from: str, size: int) -> aiosmtplib.SMTPResponse:
        """MAIL FROM, sent as it is (EHLO was said by then): the addresses were validated at
        ingest, and aiosmtplib's per-command address parsing cost more than the rest of the
        command."""
        mail_from = ascii_email(mail_from)
        args = [b"FROM:<" + mail_from.encode() + b">"]
        if size:
            args.append(b"SIZE=%d" % size)
        return await self._command(b"MAIL", *args)

    def _command(self, *args: bytes) -> Awaitable[aiosmtplib.SMTPResponse]:
        """A command of the transaction and its reply, within `command_timeout`."""
        reply = self._smtp.execute_command(*args, timeout=None)
        return self._within(self._command_timeout, args[0].decode(), reply)

    async def _within(
        self, seconds: float, what: str, reply: Awaitable[aiosmtplib.SMTPResponse]
    ) -> aiosmtplib.SMTPResponse:
        """The reply, or the connection cut if it has not come within `seconds` (then the
        wait ends with aiosmtplib's SMTPServerDisconnected, and `_late` says what was late)."""
        timer = asyncio.get_running_loop().call_later(seconds, self._cut, what, seconds)
        try:
            return await reply
        finally:
            timer.cancel()

    def _cut(self, what: str, seconds: float) -> None:
        self._late = f"no reply to {what} within {seconds:g} s"
        log.info("%s: %s: closing the connection", self.host, self._late)
        self._smtp.close()

    async def _data(self, data: bytes) -> aiosmtplib.SMTPResponse:
        """DATA and the message: the reply to DATA if it was not 354, else the reply to the
        end of the message (`data_timeout`). Written through aiosmtplib's protocol rather
        than `SMTP.data`, which ran two regular expressions over every message: the message
        is dot-stuffed here with a byte replace when its line ends are all CRLF already (as
        the MIME builder and the DKIM signer make them), and normalised otherwise."""
        resp = await self._command(b"DATA")
        if resp.code != 354:
            return resp
        protocol = self._smtp.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        protocol.write(_wire_data(data))
        reply = protocol.read_response(timeout=None)
        return await self._within(self._data_timeout, "the end of DATA", reply)

    async def _abort(self, code: int) -> None:
        """End an aborted transaction: RSET, or close after 421 (the server is leaving)."""
        if code == 421:
            await self.close()
        else:
            await self._smtp.rset()

    async def close(self) -> None:
        if self._smtp.is_connected:
            try:
                await self._smtp.quit()
            except (aiosmtplib.SMTPException, OSError):
                self._smtp.close()


def _wire_data(message: bytes) -> bytes:
    """The message as DATA carries it (RFC 5321 4.1.1.4, 4.5.2): CRLF line ends, a dot
    doubled at the start of a line, a final CRLF, and the ending "." line."""
    crlf = message.count(b"\r\n")
    if message.count(b"\n") != crlf or message.count(b"\r") != crlf:
        message = normalize_message_line_endings(message)  # (lone CR or LF: rare)
    elif not message.endswith(b"\r\n"):
        message += b"\r\n"
    message = message.replace(b"\r\n.", b"\r\n..")
    if message.startswith(b"."):
        message = b"." + message
    return message + b".\r\n"
