"""Real servers for tests: a scripted SMTP server (aiosmtpd) and a webhook receiver (aiohttp).

The DNS server is sluice.devdns.DnsServer, a real UDP nameserver; nats-server is the real
binary (sluice.natsserver.NatsServer).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import ssl
import subprocess
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from aiosmtpd.smtp import SMTP, Envelope, Session
from standardwebhooks.webhooks import Webhook


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool = False

    @property
    def message(self) -> EmailMessage:
        msg = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        return msg


@dataclass
class ScriptedSmtp:
    """Answers RCPT per recipient from a script, e.g. {"a@x.test": ["450 4.2.1 Mailbox busy"]};
    each scripted reply is used once, then recipients are accepted with 250."""

    script: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    received: list[Received] = field(default_factory=list)
    rcpt_attempts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # When each RCPT for an address came (time.monotonic()).
    rcpt_times: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    ehlo_names: list[str] = field(default_factory=list)
    # Replies for the next MAILs, used once each (then MAIL is accepted), and each MAIL's
    # parameters (e.g. ["SIZE=2048"]).
    mail_script: list[str] = field(default_factory=list)
    mail_options: list[list[str]] = field(default_factory=list)
    # How many RSETs the server was sent.
    rsets: int = 0
    # Seconds each DATA takes, per recipient domain (a slow destination).
    data_delay: dict[str, float] = field(default_factory=dict)
    # Seconds each RCPT takes, per recipient domain.
    rcpt_delay: dict[str, float] = field(default_factory=dict)
    # Replies for the next ends of DATA, used once each (then the message is taken).
    data_script: list[str] = field(default_factory=list)
    # A reply for every RCPT to a domain while set, e.g. "421 4.7.0 rate limited".
    domain_reply: dict[str, str] = field(default_factory=dict)
    # Connections open now and the most ever open at once.
    active: int = 0
    max_active: int = 0
    # When each connection was opened and each message arrived (time.monotonic()).
    connected_at: list[float] = field(default_factory=list)
    arrived_at: list[float] = field(default_factory=list)
    # Whether EHLO offers PIPELINING (RFC 2920; aiosmtpd reads commands line by line, so
    # pipelined ones are answered in turn).
    pipelining: bool = True

    async def handle_EHLO(  # noqa: N802
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        self.ehlo_names.append(hostname)
        session.host_name = hostname
        if self.pipelining:
            responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_MAIL(  # noqa: N802
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        self.mail_options.append(list(mail_options))
        if self.mail_script:
            return self.mail_script.pop(0)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        self.rsets += 1
        return "250 OK"

    async def handle_RCPT(  # noqa: N802
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        self.rcpt_attempts[address] += 1
        self.rcpt_times[address].append(time.monotonic())
        delay = self.rcpt_delay.get(address.rpartition("@")[2], 0.0)
        if delay:
            await asyncio.sleep(delay)
        queue = self.script.get(address)
        if queue:
            return queue.pop(0)
        forced = self.domain_reply.get(address.rpartition("@")[2])
        if forced:
            return forced
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(  # noqa: N802
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        delay = self.data_delay.get(envelope.rcpt_tos[0].rpartition("@")[2], 0.0)
        if delay:
            await asyncio.sleep(delay)
        if self.data_script:
            return self.data_script.pop(0)
        self.arrived_at.append(time.monotonic())
        self.received.append(
            Received(
                str(envelope.mail_from),
                list(envelope.rcpt_tos),
                bytes(envelope.original_content or b""),
                session.ssl is not None,
            )
        )
        return "250 2.0.0 Queued"

    def to(self, rcpt: str) -> list[Received]:
        return [r for r in self.received if rcpt in r.rcpt_tos]


class _CountingSMTP(SMTP):
    """aiosmtpd's SMTP, counting concurrent connections on the handler."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        handler: ScriptedSmtp = self.event_handler
        handler.active += 1
        handler.max_active = max(handler.max_active, handler.active)
        handler.connected_at.append(time.monotonic())
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        handler: ScriptedSmtp = self.event_handler
        handler.active -= 1
        super().connection_lost(exc)


async def start_smtp(
    handler: ScriptedSmtp,
    tls_context: ssl.SSLContext | None = None,
    data_size_limit: int = 33554432,
) -> tuple[asyncio.Server, int]:
    """A scripted SMTP server on a free port; with a TLS context it offers STARTTLS."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _CountingSMTP(
            handler,
            hostname="mx.test",
            enable_SMTPUTF8=False,
            tls_context=tls_context,
            data_size_limit=data_size_limit,
        ),
        "127.0.0.1",
        0,
    )
    port = int(server.sockets[0].getsockname()[1])
    return server, port


async def start_hook_server(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> tuple[web.AppRunner, str]:
    """An HTTP server on a free loopback port answering POST /hook with `handler`; returns
    its runner (clean it up) and the URL."""
    app = web.Application()
    app.router.add_post("/hook", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None
    port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
    return runner, f"http://127.0.0.1:{port}/hook"


@dataclass
class WebhookCall:
    headers: dict[str, str]
    body: bytes
    verified: dict[str, Any] | None
    error: str | None


@dataclass
class WebhookReceiver:
    """Collects POSTs; verifies each with the independent `standardwebhooks` package."""

    secret: str = ""
    calls: list[WebhookCall] = field(default_factory=list)
    runner: web.AppRunner | None = None
    port: int = 0

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        verified: dict[str, Any] | None = None
        error = None
        try:
            verified = Webhook(self.secret).verify(body, headers)
        except Exception as exc:
            error = repr(exc)
        self.calls.append(WebhookCall(headers, body, verified, error))
        return web.Response(status=204)

    async def start(self) -> str:
        self.runner, url = await start_hook_server(self._handle)
        self.port = urlsplit(url).port or 0
        return url

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def of_type(self, event_type: str) -> list[WebhookCall]:
        return [c for c in self.calls if c.verified and c.verified.get("type") == event_type]


def self_signed_context(directory: Path, name: str = "mx.tls.test") -> ssl.SSLContext:
    """A server TLS context with a fresh self-signed certificate (made with openssl)."""
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            f"/CN={name}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx
