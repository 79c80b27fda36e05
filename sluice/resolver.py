"""The DNS seam shared by the scheduler (grouping domains into sites) and the deliverer.

MX lookup with dnspython, cached by TTL. RFC 5321 5.1: no MX means the domain itself is
the mail host (implicit MX). RFC 7505: a single "MX 0 ." is a null MX, a permanent failure.
Failures become `DnsPermanent` or `DnsTemporary`.

Queries go through `StubClient`, a small stub resolver on dnspython's wire parsers: one UDP
socket per nameserver for all queries (answers matched by id and question), TCP when an
answer is truncated. dnspython's own resolver spent about five times the CPU per query
(a socket, a resolution object, a whole message and an answer object each), and a long
tail of domains makes the deliverer and the scheduler do thousands of lookups.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import cast

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver

from sluice.config import DnsConfig
from sluice.singleflight import SingleFlight

__all__ = ["DnsError", "DnsPermanent", "DnsTemporary", "MxHost", "Resolver"]


class DnsError(Exception):
    """A DNS lookup failed."""


class DnsPermanent(DnsError):
    """The domain cannot receive mail (NXDOMAIN, null MX)."""


class DnsTemporary(DnsError):
    """The lookup may succeed later (SERVFAIL, timeout)."""


@dataclass(frozen=True)
class MxHost:
    preference: int
    host: str


def parse_routes(routes: tuple[str, ...]) -> dict[str, tuple[str, int | None]]:
    """ "example.com=relay.example.net:2525" entries as {domain: (host, port)}."""
    out: dict[str, tuple[str, int | None]] = {}
    for entry in routes:
        domain, sep, target = entry.partition("=")
        host, _, port = target.strip().rpartition(":") if ":" in target else (target, "", "")
        if not sep or not domain.strip() or not (host or target).strip():
            raise ValueError(f"route {entry!r}: use domain=host[:port]")
        out[domain.strip().lower()] = (
            (host or target).strip().lower(),
            int(port) if port else None,
        )
    return out


class _NoSuchName(Exception):
    """NXDOMAIN."""


class _NoAnswer(Exception):
    """The name exists but has no records of the type asked for."""


class _Unanswered(Exception):
    """No nameserver gave a usable answer in time (timeouts, SERVFAIL, REFUSED, ...)."""


class _Batch:
    """Replies to queries sent together, by id, as they arrive: `arrived` is set when some
    came since it was made, or the try ended (its time is up, or the socket failed: what
    is missing is asked again alone)."""

    def __init__(self) -> None:
        self.replies: list[tuple[int, bytes]] = []
        self.arrived: asyncio.Future[None] | None = None
        self.outstanding = 0  # (replies the waiter still waits for)
        self.ended = False  # (the try's time is up, or the socket failed)
        self._gather: asyncio.TimerHandle | None = None

    def put(self, qid: int, data: bytes) -> None:
        self.replies.append((qid, data))
        if len(self.replies) >= self.outstanding:
            self.wake()
        elif self._gather is None and self.arrived is not None:
            # (the replies of the next moment with this one: waking once a reply cost
            # more than the reply's own work)
            self._gather = asyncio.get_running_loop().call_later(_GATHER, self.wake)

    def end(self) -> None:
        self.ended = True
        self.wake()

    def wake(self) -> None:
        if self._gather is not None:
            self._gather.cancel()
            self._gather = None
        if self.arrived is not None and not self.arrived.done():
            self.arrived.set_result(None)


class _Endpoint(asyncio.DatagramProtocol):
    """One UDP socket to one nameserver; answers go to the query (or batch of queries)
    waiting for their id."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.waiting: dict[int, asyncio.Future[bytes] | _Batch] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) >= 2:
            qid = int.from_bytes(data[:2], "big")
            waiter = self.waiting.pop(qid, None)
            if isinstance(waiter, _Batch):
                waiter.put(qid, data)
            elif waiter is not None and not waiter.done():
                waiter.set_result(data)

    def error_received(self, exc: Exception) -> None:  # e.g. ICMP port unreachable
        for waiter in self.waiting.values():
            if isinstance(waiter, _Batch):
                waiter.end()
            elif not waiter.done():
                waiter.set_exception(exc)
        self.waiting.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self.error_received(exc or ConnectionError("DNS socket closed"))
        self.transport = None


_HEADER = struct.Struct("!HHHHHH")  # id, flags, and the four section counts
_QUESTION = struct.Struct("!HH")  # type, class
_RECORD = struct.Struct("!HHIH")  # type, class, TTL, data length
_U16 = struct.Struct("!H")
# An answer's value: an address (A, AAAA), a name (CNAME), or (preference, host) (MX).
Value = str | tuple[int, str]
_Record = tuple[str, int, int, Value]  # owner, type, TTL, value
Answer = tuple[list[Value], float]  # a query's values (CNAMEs followed) and their TTL
_CHAIN = 16  # CNAMEs followed at most
_GATHER = 0.01  # seconds a batch's reply waits for those that come after it
_POINTERS = 64  # compression pointers followed in one name at most
_TO_QUESTION = b"\xc0\x0c"  # a compressed name: the one at offset 12, the question's
# Label bytes written as they are in a name's text; dnspython escapes the others (the
# special characters with a backslash, the rest as \DDD), and so does _label.
_SPECIAL = b'"().;\\@$'
_PLAIN = bytes(c for c in range(0x21, 0x7F) if c not in _SPECIAL)
# Address record types: their family and size.
_ADDRESS: dict[int, tuple[socket.AddressFamily, int]] = {
    dns.rdatatype.A: (socket.AF_INET, 4),
    dns.rdatatype.AAAA: (socket.AF_INET6, 16),
}


def _label(label: bytes) -> str:
    if not label.translate(None, _PLAIN):
        return label.decode("ascii")
    return "".join(
        chr(c) if c in _PLAIN else f"\\{chr(c)}" if c in _SPECIAL else f"\\{c:03d}" for c in label
    )


def _read_name(wire: bytes, pos: int) -> tuple[str, int]:
    """The name at `pos` as text (lower case, no final dot: "" for the root) and the offset
    after it. Compression pointers are followed (RFC 1035 4.1.4), at most _POINTERS of them,
    each to before the last one's target (as dnspython requires: a malformed reply cannot
    loop) and past the header."""
    labels: list[str] = []
    after = -1
    pointers = 0
    limit = pos  # (the next pointer must point before this)
    size = 1
    while True:
        n = wire[pos]
        if n >= 0xC0:
            target = ((n & 0x3F) << 8) | wire[pos + 1]
            if after < 0:
                after = pos + 2
            pointers += 1
            if pointers > _POINTERS or not _HEADER.size <= target < limit:
                raise _Unanswered("a malformed name in the answer")
            pos = limit = target
            continue
        if n >= 0x40:
            raise _Unanswered("an unknown label type in the answer")
        if n == 0:
            break
        label = wire[pos + 1 : pos + 1 + n]
        if len(label) != n:
            raise _Unanswered("a name cut short in the answer")
        size += n + 1
        if size > 255:
            raise _Unanswered("a name longer than 255 octets in the answer")
        labels.append(_label(label.lower()))
        pos += n + 1
    return ".".join(labels), after if after >= 0 else pos + 1


def _wire_name(name: str) -> bytes:
    """`name` in wire form (a plain ASCII name directly; others through dnspython, which
    reads escapes and encodes international names)."""
    text = name[:-1] if name.endswith(".") else name
    if text.isascii() and "\\" not in text and len(text) < 254:
        labels = text.encode("ascii").split(b".")
        if all(0 < len(label) < 64 for label in labels):
            return b"".join(bytes((len(label),)) + label for label in labels) + b"\0"
    return cast(bytes, dns.name.from_text(name).to_wire())


def _value(wire: bytes, pos: int, rtype: int, size: int) -> Value:
    if (address := _ADDRESS.get(rtype)) is not None:
        family, length = address
        if size != length:
            raise _Unanswered("an address of the wrong size in the answer")
        return socket.inet_ntop(family, wire[pos : pos + size])
    if rtype == dns.rdatatype.MX:
        (preference,) = _U16.unpack_from(wire, pos)
        host, end = _read_name(wire, pos + 2)
    else:  # CNAME
        preference = -1
        host, end = _read_name(wire, pos)
    if end != pos + size:
        raise _Unanswered("a record whose data is not its length")
    return host if preference < 0 else (preference, host)


def _read_reply(
    wire: bytes, qid: int, question: bytes, qname: str, rdtype: dns.rdatatype.RdataType
) -> tuple[int, list[_Record]] | None:
    """The rcode and the answer section's records of the question's class and of its type
    or CNAME; None when truncated. `question` is the question section as sent, `qname` its
    name as _read_name gives it.

    Building a whole `dns.message.Message` (sections, rrsets, their hashes) cost three
    quarters of a lookup's CPU, and reading names and records with dnspython's parsers
    most of the rest (a long tail of domains makes thousands of lookups). So the question
    is compared as bytes (case aside), an owner that points at it (the usual compression)
    is taken for the asked name, and names, addresses and MX records are read here."""
    if len(wire) < _HEADER.size + len(question):
        raise _Unanswered("a reply too short for the question")
    rid, flags, questions, answers, _, _ = _HEADER.unpack_from(wire)
    end = _HEADER.size + len(question)
    name_end = end - _QUESTION.size
    if (
        rid != qid
        or not flags & dns.flags.QR
        or dns.opcode.from_flags(flags) != dns.opcode.QUERY
        or questions != 1
        or wire[_HEADER.size : name_end].lower() != question[: -_QUESTION.size].lower()
        or wire[name_end:end] != question[-_QUESTION.size :]
    ):
        raise _Unanswered("an answer that does not match the question")
    if flags & dns.flags.TC:
        return None
    records: list[_Record] = []
    pos = end
    try:
        for _ in range(answers):
            if wire[pos : pos + 2] == _TO_QUESTION:
                owner, pos = qname, pos + 2
            else:
                owner, pos = _read_name(wire, pos)
            rtype, rclass, ttl, size = _RECORD.unpack_from(wire, pos)
            pos += _RECORD.size
            if pos + size > len(wire):
                raise _Unanswered("a record cut short in the answer")
            if rclass == dns.rdataclass.IN and rtype in (rdtype, dns.rdatatype.CNAME):
                records.append((owner, rtype, ttl, _value(wire, pos, rtype, size)))
            pos += size
    except (IndexError, struct.error, OSError, ValueError) as exc:
        raise _Unanswered(f"a malformed answer ({exc})") from exc
    return int(dns.rcode.from_flags(flags, 0)), records


def _time_out(waiter: asyncio.Future[bytes]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def _follow(
    records: list[_Record], qname: str, rdtype: dns.rdatatype.RdataType
) -> tuple[list[Value], float] | None:
    """The values of type `rdtype` for `qname`, through its CNAMEs, and the lowest TTL on
    the way; None when the answer has none."""
    name, ttl = qname, float("inf")
    for _ in range(_CHAIN):
        found = [(t, v) for owner, rtype, t, v in records if rtype == rdtype and owner == name]
        if found:
            return [v for _, v in found], float(min(ttl, *(t for t, _ in found)))
        alias = next(
            (
                (t, cast(str, v))
                for owner, rtype, t, v in records
                if rtype == dns.rdatatype.CNAME and owner == name
            ),
            None,
        )
        if alias is None:
            return None
        ttl, name = min(ttl, alias[0]), alias[1]
    return None


def _decided(
    name: str, qname: str, rdtype: dns.rdatatype.RdataType, rcode: int, records: list[_Record]
) -> Answer | Exception | None:
    """What a reply's rcode and records decide: the answer, _NoSuchName or _NoAnswer; None
    when another try is due (SERVFAIL, REFUSED, ...). `qname` is the name as _read_name
    gives it."""
    if rcode == dns.rcode.NXDOMAIN:
        return _NoSuchName(name)
    if rcode != dns.rcode.NOERROR:
        return None
    answer = _follow(records, qname, rdtype)
    return _NoAnswer(name) if answer is None else answer


def _settled(
    name: str, wire: bytes, qid: int, question: bytes, qname: str, rdtype: dns.rdatatype.RdataType
) -> Answer | Exception | None:
    """What query() makes of one try's reply (_decided); None also for a reply not to the
    question, or truncated."""
    try:
        reply = _read_reply(wire, qid, question, qname, rdtype)
    except _Unanswered:
        return None
    return None if reply is None else _decided(name, qname, rdtype, *reply)


class StubClient:
    """Recursive-desired queries to the configured nameservers, in order: the first that
    answers (other than SERVFAIL or REFUSED) decides; a timeout or failure tries the next,
    round after round, until `timeout` (the lifetime of a lookup) is spent."""

    def __init__(self, nameservers: list[str], port: int, timeout: float) -> None:
        self.nameservers = nameservers
        self.port = port
        self.timeout = timeout
        self._endpoints: dict[str, tuple[asyncio.AbstractEventLoop, _Endpoint]] = {}
        self._opening: SingleFlight[tuple[asyncio.AbstractEventLoop, str], _Endpoint] = (
            SingleFlight()
        )

    async def query(
        self,
        name: str,
        rdtype: dns.rdatatype.RdataType,
        lifetime: float | None = None,
        first: int = 0,
    ) -> Answer:
        """The answer's values (CNAMEs followed) and the TTL of the whole chain: addresses
        as text for A and AAAA, (preference, host) for MX. The lookup takes at most
        `lifetime` seconds (`timeout` unless given), and its rounds start at nameserver
        `first` (then the next ones, in order)."""
        if not self.nameservers:
            raise _Unanswered(f"{name}: no nameservers")
        qname = _wire_name(name)
        text = _read_name(qname, 0)[0]
        deadline = time.monotonic() + (self.timeout if lifetime is None else lifetime)
        errors: list[str] = []
        while True:
            for ns in self.nameservers[first:] + self.nameservers[:first]:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _Unanswered(f"{name} {rdtype.name}: {'; '.join(errors) or 'no answer'}")
                try:
                    # A try waits a third of the lifetime, so a silent nameserver leaves
                    # time for the next.
                    rcode, records = await self._ask(ns, qname, rdtype, min(left, self.timeout / 3))
                except (
                    TimeoutError,
                    OSError,
                    EOFError,  # (dnspython's TCP read of a connection closed early)
                    _Unanswered,
                    dns.exception.DNSException,
                ) as exc:
                    errors.append(f"{ns}: {exc!r}")
                    continue
                outcome = _decided(name, text, rdtype, rcode, records)
                if outcome is None:
                    errors.append(f"{ns}: {dns.rcode.to_text(dns.rcode.Rcode(rcode))}")
                    continue
                if isinstance(outcome, Exception):
                    raise outcome
                return outcome
            await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    async def answers(
        self, names: list[str], rdtype: dns.rdatatype.RdataType
    ) -> AsyncIterator[list[tuple[int, Answer | Exception]]]:
        """query() of each of `names`, as (index, its answer or the exception query()
        raised), in the order they come, those that came together in one list.

        The first try of every name goes to the first nameserver at once, and the replies
        are read as they arrive, each with those that come in the next _GATHER seconds:
        one waiter for all, where a query() each cost a coroutine chain, a future and a
        timer (a long tail's scheduler looks up thousands of domains: 140-167 µs of CPU
        each that way, 86-96 this way, `bench.dns_lookup`). A name that try does not
        settle within a third of the lookup's lifetime (no answer, SERVFAIL, a truncated
        answer, ...) goes through query() with what is left of it, beside the others; one
        left unanswered from the next nameserver on, as query() would have gone on."""
        start = time.monotonic()
        loop = asyncio.get_running_loop()
        batch = _Batch()
        # Queries sent: id -> (index, question as sent, the name as _read_name gives it).
        sent: dict[int, tuple[int, bytes, str]] = {}
        again: list[int] = []
        endpoint: _Endpoint | None = None
        timer: asyncio.TimerHandle | None = None
        try:
            if self.nameservers:
                endpoint = await self._endpoint(self.nameservers[0])
        except (OSError, _Unanswered):
            endpoint = None
        try:
            for i, name in enumerate(names):
                try:
                    if endpoint is None or endpoint.transport is None:
                        raise _Unanswered("no socket")
                    qname = _wire_name(name)
                except (_Unanswered, dns.exception.DNSException):
                    again.append(i)  # (query() meets the same, and says so)
                    continue
                qid = random.getrandbits(16)
                while qid in endpoint.waiting:
                    qid = random.getrandbits(16)
                question = qname + _QUESTION.pack(rdtype, dns.rdataclass.IN)
                endpoint.waiting[qid] = batch
                sent[qid] = (i, question, _read_name(qname, 0)[0])
                endpoint.transport.sendto(_HEADER.pack(qid, dns.flags.RD, 1, 0, 0, 0) + question)
            # (one timer for the try, not one per wait: replies come a few at a time)
            timer = loop.call_later(self.timeout / 3, batch.end)
            while sent and (batch.replies or not batch.ended):
                if not batch.replies:
                    batch.outstanding = len(sent)
                    batch.arrived = loop.create_future()
                    await batch.arrived
                replies, batch.replies = batch.replies, []
                came: list[tuple[int, Answer | Exception]] = []
                for qid, wire in replies:
                    if (one := sent.pop(qid, None)) is None:
                        continue
                    outcome = _settled(names[one[0]], wire, qid, *one[1:], rdtype)
                    if outcome is None:
                        again.append(one[0])
                    else:
                        came.append((one[0], outcome))
                if came:
                    yield came
        finally:
            if timer is not None:
                timer.cancel()
            batch.wake()  # (its gathering timer)
            if endpoint is not None:
                for qid in sent:
                    if endpoint.waiting.get(qid) is batch:
                        del endpoint.waiting[qid]
        # (unanswered: the first nameserver is silent, or lost them; asked again from the next)
        silent = {one[0] for one in sent.values()}
        again.extend(silent)
        if not again:
            return
        lifetime = max(0.0, self.timeout - (time.monotonic() - start))
        nexts = 1 if len(self.nameservers) > 1 else 0
        tasks = {
            asyncio.ensure_future(
                self.query(names[i], rdtype, lifetime, nexts if i in silent else 0)
            ): i
            for i in again
        }
        pending = set(tasks)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                came = []
                for task in done:
                    exc = task.exception()
                    if exc is not None and not isinstance(exc, Exception):
                        raise exc
                    came.append((tasks[task], exc if exc is not None else task.result()))
                yield came
        finally:
            for task in pending:
                task.cancel()

    async def _ask(
        self, ns: str, qname: bytes, rdtype: dns.rdatatype.RdataType, wait: float
    ) -> tuple[int, list[_Record]]:
        """The rcode and answer records of one try at one nameserver."""
        endpoint = await self._endpoint(ns)
        qid = random.getrandbits(16)
        while qid in endpoint.waiting:
            qid = random.getrandbits(16)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bytes] = loop.create_future()
        endpoint.waiting[qid] = waiter
        question = qname + _QUESTION.pack(rdtype, dns.rdataclass.IN)
        name = _read_name(qname, 0)[0]
        # (a future and a timer: cheaper than wait_for)
        timer = loop.call_later(wait, _time_out, waiter)
        try:
            assert endpoint.transport is not None
            endpoint.transport.sendto(_HEADER.pack(qid, dns.flags.RD, 1, 0, 0, 0) + question)
            wire = await waiter
        finally:
            timer.cancel()
            endpoint.waiting.pop(qid, None)
        reply = _read_reply(wire, qid, question, name, rdtype)
        if reply is None:  # truncated: again over TCP
            query = dns.message.make_query(dns.name.from_wire(qname, 0)[0], rdtype)
            query.id = qid
            response = await dns.asyncquery.tcp(query, ns, timeout=wait, port=self.port)
            reply = _read_reply(response.to_wire(), qid, question, name, rdtype)
            if reply is None:
                raise _Unanswered("a truncated answer over TCP")
        return reply

    async def _endpoint(self, ns: str) -> _Endpoint:
        loop = asyncio.get_running_loop()
        known = self._endpoints.get(ns)
        if known is not None and known[0] is loop and known[1].transport is not None:
            return known[1]
        # (one socket at a time: the lookups that start together wait for it; each opened
        # its own before, and all but the last stayed open unused, 60-100 per process)
        return await self._opening.do((loop, ns), lambda: self._open(loop, ns))

    async def _open(self, loop: asyncio.AbstractEventLoop, ns: str) -> _Endpoint:
        _, endpoint = await loop.create_datagram_endpoint(_Endpoint, remote_addr=(ns, self.port))
        self._endpoints[ns] = (loop, endpoint)
        return endpoint


class Resolver:
    """MX and address lookups with a TTL cache."""

    def __init__(self, cfg: DnsConfig) -> None:
        if cfg.nameservers:
            nameservers, port = list(cfg.nameservers), cfg.port
        else:  # the system's (resolv.conf)
            system = dns.resolver.Resolver(configure=True)
            nameservers, port = [str(ns) for ns in system.nameservers], system.port
        self._client = StubClient(nameservers, port, float(cfg.timeout))
        self._mx: dict[str, tuple[float, list[MxHost]]] = {}
        self._addr: dict[str, tuple[float, list[str]]] = {}
        self._routes = parse_routes(cfg.routes)
        # One lookup per name at a time: the connection loops of a site open together and
        # asked for its host's addresses together (2,091 A queries for 1,694 hosts in a
        # 100,000-recipient long tail).
        self._mx_lookups: SingleFlight[str, list[MxHost]] = SingleFlight()
        self._addr_lookups: SingleFlight[str, list[str]] = SingleFlight()

    def route(self, domain: str) -> tuple[str, int | None] | None:
        """The (host, port) a route override sends this domain's mail to, if any ("*" matches
        every domain); the port is None when the route names none."""
        return self._routes.get(domain.lower()) or self._routes.get("*")

    async def mx(self, domain: str) -> list[MxHost]:
        """MX hosts by preference (lowest first); implicit MX if there are none. A route
        override replaces the lookup (like Postfix's transport map)."""
        if (hosts := self._mx_without_lookup(domain)) is not None:
            return hosts
        return await self._mx_lookups.do(domain, lambda: self._look_up_mx(domain))

    def _mx_without_lookup(self, domain: str) -> list[MxHost] | None:
        """The domain's route, or its cached MX hosts; None when it must be looked up."""
        if (route := self.route(domain)) is not None:
            return [MxHost(0, route[0])]
        known = self.known_mx(domain)
        return known[0] if known is not None else None

    async def mx_many(
        self, domains: list[str]
    ) -> AsyncIterator[list[tuple[str, list[MxHost] | DnsError]]]:
        """mx() of each of `domains`, as (domain, its hosts or the DnsError mx() raised), in
        the order they come, those that came together in one list (an item at a time cost
        more than the lookup's parsing): from the cache first, then the lookups, sent
        together (StubClient.answers). A lookup of the same domain already running is not
        shared."""
        ask: list[str] = []
        cached: list[tuple[str, list[MxHost] | DnsError]] = []
        for domain in domains:
            if (hosts := self._mx_without_lookup(domain)) is not None:
                cached.append((domain, hosts))
            else:
                ask.append(domain)
        if cached:
            yield cached
        if not ask:
            return
        now = time.monotonic()
        async for came in self._client.answers(ask, dns.rdatatype.MX):
            found: list[tuple[str, list[MxHost] | DnsError]] = []
            for i, answer in came:
                try:
                    found.append((ask[i], self._mx_answer(ask[i], answer, now)))
                except DnsError as exc:
                    found.append((ask[i], exc))
            yield found

    async def _look_up_mx(self, domain: str) -> list[MxHost]:
        now = time.monotonic()
        try:
            answer: Answer | Exception = await self._client.query(domain, dns.rdatatype.MX)
        except (_NoSuchName, _NoAnswer, _Unanswered, dns.exception.DNSException) as exc:
            answer = exc
        return self._mx_answer(domain, answer, now)

    def _mx_answer(self, domain: str, answer: Answer | Exception, now: float) -> list[MxHost]:
        """The MX hosts of a query's answer (cached), or the DnsError of its failure (an
        exception of another kind is raised as it is)."""
        if isinstance(answer, _NoSuchName):
            raise DnsPermanent(f"{domain}: no such domain") from answer
        if isinstance(answer, _NoAnswer):
            hosts, ttl = [MxHost(0, domain)], 300.0
        elif isinstance(answer, _Unanswered | dns.exception.DNSException):
            raise DnsTemporary(f"{domain}: MX lookup failed: {answer}") from answer
        elif isinstance(answer, Exception):
            raise answer
        else:
            records, ttl = answer
            hosts = sorted(
                (MxHost(*record) for record in cast(list[tuple[int, str]], records)),
                key=lambda h: (h.preference, h.host),
            )
        if len(hosts) == 1 and hosts[0].host in ("", "."):
            raise DnsPermanent(f"{domain}: null MX (RFC 7505), the domain accepts no mail")
        self._mx[domain] = (now + ttl, hosts)
        return hosts

    def known_mx(self, domain: str) -> tuple[list[MxHost], float] | None:
        """The domain's MX hosts from the cache, and the seconds left of their TTL (None when
        not cached: never looked up, expired, a failed lookup, or a route's domain)."""
        cached = self._mx.get(domain)
        left = cached[0] - time.monotonic() if cached else 0.0
        return (cached[1], left) if cached and left > 0 else None

    def learn_mx(self, domain: str, hosts: list[MxHost], ttl: float) -> None:
        """Cache MX hosts another process looked up (the scheduler sends them with a lease)
        for `ttl` seconds, unless the cache already has them."""
        if hosts and ttl > 0 and self.known_mx(domain) is None:
            self._mx[domain] = (time.monotonic() + ttl, hosts)

    async def addresses(self, host: str) -> list[str]:
        """IPv4 then IPv6 addresses of a host."""
        cached = self._addr.get(host)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        return await self._addr_lookups.do(host, lambda: self._look_up_addresses(host))

    async def _look_up_addresses(self, host: str) -> list[str]:
        now = time.monotonic()
        found: list[str] = []
        ttl = 300.0
        temporary: DnsError | None = None
        rdtypes = (dns.rdatatype.A, dns.rdatatype.AAAA)
        # (both at once: one trip through the event loop instead of two)
        answers = await asyncio.gather(
            *(self._client.query(host, rdtype) for rdtype in rdtypes), return_exceptions=True
        )
        for rdtype, result in zip(rdtypes, answers, strict=True):
            if isinstance(result, _NoSuchName | _NoAnswer):
                continue
            if isinstance(result, _Unanswered | dns.exception.DNSException):
                temporary = DnsTemporary(f"{host}: {rdtype.name} lookup failed: {result}")
                continue
            if isinstance(result, BaseException):
                raise result
            answer, answer_ttl = result
            found.extend(cast(list[str], answer))
            ttl = min(ttl, answer_ttl)
        if not found:
            if temporary is not None:
                raise temporary
            raise DnsPermanent(f"{host}: no A or AAAA record")
        self._addr[host] = (now + ttl, found)
        return found

    @staticmethod
    def in_order(hosts: list[MxHost]) -> list[MxHost]:
        """Hosts by preference, shuffled among equal preferences (RFC 5321 5.1)."""
        groups: dict[int, list[MxHost]] = {}
        for h in hosts:
            groups.setdefault(h.preference, []).append(h)
        out: list[MxHost] = []
        for pref in sorted(groups):
            group = groups[pref][:]
            random.shuffle(group)
            out.extend(group)
        return out
