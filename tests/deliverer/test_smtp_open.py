"""Opening a connection (deliverer/smtp.py, SmtpConnection.open), against a raw server on
loopback that says exactly what each test scripts: the greeting, EHLO's extensions, HELO
when EHLO is refused, STARTTLS offered or required (and EHLO again over TLS), and each way
an opening fails: a refused greeting, EHLO and HELO refused, no greeting in time, TLS
required but not offered, bytes injected with the reply to STARTTLS."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvloop

from deliverer.smtp import ConnectionLost, SmtpConnection
from tests.servers import self_signed_context


@dataclass
class Opening:
    """A raw SMTP server for a connection's opening. It offers STARTTLS when it has a TLS
    context, and records each command it was sent (`said`, upper-case verbs)."""

    greeting: bytes = b"220 mx.test ESMTP\r\n"
    ehlo: bytes = b"250-mx.test greets you\r\n250-PIPELINING\r\n250 SIZE 1000\r\n"
    ehlo_over_tls: bytes = b"250-mx.test\r\n250 SIZE 2000\r\n"
    helo: bytes = b"250 mx.test\r\n"
    tls: ssl.SSLContext | None = None
    with_tls_reply: bytes = b""  # sent in the same write as the reply to STARTTLS
    silent: bool = False  # no greeting at all
    said: list[str] = field(default_factory=list)
    over_tls: list[bool] = field(default_factory=list)  # (per command)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.silent:
            await reader.read()
            writer.close()
            return
        writer.write(self.greeting)
        secure = False
        while line := await reader.readline():
            verb = line.split(b" ")[0].strip().upper().decode()
            self.said.append(verb)
            self.over_tls.append(secure)
            if verb == "EHLO":
                reply = self.ehlo_over_tls if secure else self.ehlo
                if self.tls is not None and not secure and reply.startswith(b"250"):
                    first, _, rest = reply.partition(b"\r\n")
                    reply = first.replace(b"250 ", b"250-", 1) + b"\r\n250-STARTTLS\r\n" + rest
                    if not rest:
                        reply = reply.replace(b"250-STARTTLS", b"250 STARTTLS")
                writer.write(reply)
            elif verb == "HELO":
                writer.write(self.helo)
            elif verb == "STARTTLS" and self.tls is not None:
                writer.write(b"220 2.0.0 go ahead\r\n" + self.with_tls_reply)
                await writer.drain()
                if self.with_tls_reply:
                    continue  # (the client is expected to hang up)
                await writer.start_tls(self.tls)
                secure = True
            elif verb == "QUIT":
                writer.write(b"221 2.0.0 bye\r\n")
                break
            else:
                writer.write(b"502 5.5.1 not here\r\n")
        writer.close()


@asynccontextmanager
async def serving(server: Opening) -> AsyncIterator[int]:
    srv = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()


def _conn(port: int, require_tls: bool = False, connect_timeout: float = 5.0) -> SmtpConnection:
    return SmtpConnection(
        "mx.test", "127.0.0.1", port, "deliverer.test", connect_timeout, 5.0, require_tls
    )


async def test_ehlo_says_what_the_server_offers() -> None:
    server = Opening()
    async with serving(server) as port:
        conn = _conn(port)
        await conn.open()
        assert conn.usable and not conn.tls
        assert conn._pipelining and conn._size == 1000
        await conn.close()
    assert server.said == ["EHLO", "QUIT"]


async def test_a_refused_greeting_is_connection_lost() -> None:
    server = Opening(greeting=b"554 5.7.1 go away\r\n")
    async with serving(server) as port:
        with pytest.raises(ConnectionLost, match=r"^mx\.test: greeting 554 5\.7\.1 go away$"):
            await _conn(port).open()
    assert "EHLO" not in server.said


async def test_helo_when_ehlo_is_refused() -> None:
    server = Opening(ehlo=b"500 5.5.2 what?\r\n")
    async with serving(server) as port:
        conn = _conn(port)
        await conn.open()
        assert conn.usable and not conn._pipelining and conn._size is None
        await conn.close()
    assert server.said == ["EHLO", "HELO", "QUIT"]


async def test_ehlo_and_helo_refused_is_connection_lost() -> None:
    server = Opening(ehlo=b"500 5.5.2 what?\r\n", helo=b"550 5.7.1 not you\r\n")
    async with serving(server) as port:
        with pytest.raises(ConnectionLost, match=r"^mx\.test: HELO refused: 550 5\.7\.1 not you"):
            await _conn(port).open()


async def test_no_greeting_within_the_connect_timeout() -> None:
    async with serving(Opening(silent=True)) as port:
        with pytest.raises(ConnectionLost, match=r"^mx\.test: connect failed: timed out"):
            await _conn(port, connect_timeout=0.3).open()


async def test_starttls_when_offered_and_ehlo_again_over_tls(tmp_path: Path) -> None:
    """What the server offered before TLS is forgotten (RFC 3207 4.2): PIPELINING and
    SIZE 1000 before, SIZE 2000 alone after."""
    server = Opening(tls=self_signed_context(tmp_path, "mx.test"))
    async with serving(server) as port:
        conn = _conn(port)
        await conn.open()
        assert conn.tls and not conn._pipelining and conn._size == 2000
        reply = await conn.send("a@acme.test", "x@mx.test", b"Subject: t\r\n\r\nx\r\n")
        await conn.close()
    assert server.said[:3] == ["EHLO", "STARTTLS", "EHLO"]
    assert server.over_tls[:3] == [False, False, True]
    # (this server takes no mail: MAIL was refused over TLS, as it was sent)
    assert reply.code == 502 and server.over_tls[server.said.index("MAIL")]


async def test_tls_required_but_not_offered_is_connection_lost() -> None:
    server = Opening()
    async with serving(server) as port:
        with pytest.raises(ConnectionLost, match=r"STARTTLS extension not supported"):
            await _conn(port, require_tls=True).open()
    assert server.said == ["EHLO"], "nothing sent in the clear after EHLO"


async def test_bytes_with_the_reply_to_starttls_break_the_connection(tmp_path: Path) -> None:
    """RFC 3207 6: what comes with the reply to STARTTLS would be read as if it had come
    over TLS (a man in the middle injecting replies): the connection is dropped."""
    server = Opening(
        tls=self_signed_context(tmp_path, "mx.test"), with_tls_reply=b"250 2.1.0 injected\r\n"
    )
    async with serving(server) as port:
        with pytest.raises(ConnectionLost, match=r"data after the reply to STARTTLS"):
            await _conn(port).open()


def test_starttls_on_uvloop(tmp_path: Path) -> None:
    """The services run on uvloop: its loop's start_tls hands the TLS connection's replies
    to the same reader."""
    test: Callable[[Path], Coroutine[Any, Any, None]] = (
        test_starttls_when_offered_and_ehlo_again_over_tls
    )
    uvloop.run(test(tmp_path))
