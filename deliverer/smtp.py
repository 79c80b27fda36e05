"""The SMTP seam: one client connection to one MX host, over aiosmtplib.

aiosmtplib exceptions are translated here: a reply becomes a `Reply` the classifier reads;
a connection-level failure becomes `ConnectionLost` (always temporary).
"""

from __future__ import annotations

import logging

import aiosmtplib

from deliverer.classify import Reply, parse_reply

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
    ) -> None:
        self.host = host
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

    @property
    def usable(self) -> bool:
        return self._smtp.is_connected

    async def open(self) -> None:
        try:
            await self._smtp.connect(timeout=self._connect_timeout)
        except aiosmtplib.SMTPResponseException as exc:
            raise ConnectionLost(f"{self.host}: greeting {exc.code} {exc.message}") from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise ConnectionLost(f"{self.host}: connect failed: {exc}") from exc

    async def send(self, mail_from: str, recipient: str, data: bytes) -> Reply:
        """One transaction for one recipient: the reply that decided it.

        A 4xx/5xx at MAIL or RCPT is returned (after RSET) rather than raised.
        """
        try:
            try:
                await self._smtp.mail(mail_from)
                await self._smtp.rcpt(recipient)
            except aiosmtplib.SMTPResponseException as exc:
                reply = parse_reply(exc.code, exc.message)
                if exc.code == 421:
                    await self.close()
                else:
                    await self._smtp.rset()
                return reply
            try:
                resp = await self._smtp.data(data)
            except aiosmtplib.SMTPResponseException as exc:
                if exc.code == 421:
                    await self.close()
                return parse_reply(exc.code, exc.message)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as exc:
            await self.close()
            raise ConnectionLost(f"{self.host}: {exc}") from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            await self.close()
            raise ConnectionLost(f"{self.host}: {exc}") from exc
        self.deliveries += 1
        return parse_reply(resp.code, resp.message)

    async def close(self) -> None:
        if self._smtp.is_connected:
            try:
                await self._smtp.quit()
            except (aiosmtplib.SMTPException, OSError):
                self._smtp.close()
