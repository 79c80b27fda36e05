"""A light SMTP sink for the benchmarks: a bare asyncio protocol that speaks just enough
ESMTP (EHLO with PIPELINING, MAIL, RCPT, DATA, RSET, NOOP, QUIT) to take Sluice's mail, and
counts it per site through a `SiteCounter`.

It exists because the sink shares the machine with what it measures. aiosmtpd, a full server
that parses every command into an envelope and runs a coroutine per command, took about 0.3
ms of CPU per message: 0.73 of a core for bench.shaping's long tail at 2,600 msgs/s, as much
as all of Sluice's processes together, on a 2-core machine (a real receiving server is on
another machine). This one takes a fraction of that. The body is not kept: the benchmarks
only count arrivals.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

__all__ = ["SinkProtocol", "SiteCounter"]

_EHLO = (
    b"250-sink.bench.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
    b"250 SIZE 33554432\r\n"
)
_END = b"\r\n.\r\n"


class SiteCounter:
    """What arrived, per site (a connection's site is that of its first recipient's
    domain, `site_of`): connections at once and at most, transactions, recipients and
    duplicates."""

    def __init__(self) -> None:
        self.active: dict[str, int] = defaultdict(int)
        self.peak: dict[str, int] = defaultdict(int)
        self.delivered = 0
        self.connections = 0  # connections that carried mail
        self.site_connections: dict[str, int] = defaultdict(int)
        self.site_mail: dict[str, int] = defaultdict(int)
        self.seen: set[str] = set()
        self.duplicates = 0  # deliveries to a recipient that had its message already
        self.first = 0.0
        self.last = 0.0
        self.site_of: dict[str, str] = {}

    def reset(self) -> None:
        """Forget the arrivals (for a second blast); the connection peaks stay."""
        self.delivered = self.connections = self.duplicates = 0
        self.first = self.last = 0.0
        self.seen.clear()
        self.site_connections.clear()
        self.site_mail.clear()

    def opened(self, site: str) -> None:
        self.connections += 1
        self.site_connections[site] += 1
        self.active[site] += 1
        self.peak[site] = max(self.peak[site], self.active[site])

    def closed(self, site: str) -> None:
        self.active[site] -= 1

    def arrived(self, site: str, rcpts: list[str]) -> None:
        self.delivered += 1
        self.site_mail[site] += 1
        for rcpt in rcpts:
            self.duplicates += rcpt in self.seen
            self.seen.add(rcpt)
        self.last = time.monotonic()
        self.first = self.first or self.last


class SinkProtocol(asyncio.Protocol):
    """One SMTP connection. Replies go out in the order of the commands, pipelined or not;
    the reply to the end of DATA comes `data_delay` seconds later (a receiving server takes
    a little time), and what the client sent meanwhile waits for it."""

    def __init__(self, counter: SiteCounter, data_delay: float = 0.002) -> None:
        self._counter = counter
        self._delay = data_delay
        self._buf = b""
        self._in_data = False
        self._held = False  # (the end-of-DATA reply is due: read nothing until it is sent)
        self._quit = False
        self._rcpts: list[str] = []
        self._site: str | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(b"220 sink.bench.test ESMTP\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        if self._site is not None:
            self._counter.closed(self._site)
            self._site = None
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self._work()

    def _work(self) -> None:
        transport = self._transport
        out: list[bytes] = []
        while transport is not None and not self._held and not self._quit:
            if self._in_data:
                # (the end of an empty body follows DATA's own line end)
                end = -2 if self._buf.startswith(b".\r\n") else self._buf.find(_END)
                if end == -1:
                    break
                self._buf = self._buf[end + len(_END) :]
                self._in_data = False
                self._held = True
                asyncio.get_running_loop().call_later(self._delay, self._data_done)
                break
            line, sep, rest = self._buf.partition(b"\r\n")
            if not sep:
                break
            self._buf = rest
            out.append(self._command(line))
        if out and transport is not None:
            transport.write(b"".join(out))
            if self._quit:
                transport.close()

    def _data_done(self) -> None:
        self._held = False
        if self._transport is None:
            return
        assert self._site is not None
        self._counter.arrived(self._site, self._rcpts)
        self._rcpts = []
        self._transport.write(b"250 2.0.0 OK\r\n")
        self._work()

    def _command(self, line: bytes) -> bytes:
        verb = line[:4].upper()
        if verb == b"RCPT":
            address = line.partition(b":")[2].strip().split(b" ", 1)[0].strip(b"<>").decode()
            if self._site is None:
                self._site = self._counter.site_of[address.rpartition("@")[2]]
                self._counter.opened(self._site)
            self._rcpts.append(address)
            return b"250 2.1.5 OK\r\n"
        if verb == b"MAIL":
            self._rcpts = []
            return b"250 2.1.0 OK\r\n"
        if verb == b"DATA":
            if not self._rcpts:
                return b"503 5.5.1 no valid recipients\r\n"
            self._in_data = True
            return b"354 End data with <CR><LF>.<CR><LF>\r\n"
        if verb in (b"EHLO", b"HELO"):
            return _EHLO if verb == b"EHLO" else b"250 sink.bench.test\r\n"
        if verb == b"RSET":
            self._rcpts = []
            return b"250 2.0.0 OK\r\n"
        if verb == b"NOOP":
            return b"250 2.0.0 OK\r\n"
        if verb == b"QUIT":
            self._quit = True
            return b"221 2.0.0 Bye\r\n"
        return b"500 5.5.2 command not recognized\r\n"
