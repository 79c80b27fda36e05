"""The shared resolver against a real DNS server on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import dns.flags
import dns.message
import dns.rdatatype
import dns.rrset
import pytest

from sluice.config import DnsConfig, Duration
from sluice.devdns import DnsServer
from sluice.resolver import DnsPermanent, DnsTemporary, MxHost, Resolver


@pytest.fixture
async def resolver() -> AsyncIterator[tuple[Resolver, DnsServer]]:
    srv = DnsServer(
        {
            "multi.test": [("MX", "20 b.multi.test."), ("MX", "10 a.multi.test.")],
            "a.multi.test": [("A", "127.0.0.2")],
            "implicit.test": [("A", "127.0.0.3")],
            "nullmx.test": [("MX", "0 .")],
        }
    )
    srv.servfail.add("broken.test")
    port = await srv.start()
    yield Resolver(DnsConfig(nameservers=("127.0.0.1",), port=port, timeout=Duration(2.0))), srv
    srv.close()


async def test_mx_sorted_by_preference(resolver: tuple[Resolver, DnsServer]) -> None:
    r, _ = resolver
    assert await r.mx("multi.test") == [MxHost(10, "a.multi.test"), MxHost(20, "b.multi.test")]
    assert await r.addresses("a.multi.test") == ["127.0.0.2"]


async def test_implicit_mx(resolver: tuple[Resolver, DnsServer]) -> None:
    r, _ = resolver
    assert await r.mx("implicit.test") == [MxHost(0, "implicit.test")]


async def test_null_mx_and_nxdomain_are_permanent(resolver: tuple[Resolver, DnsServer]) -> None:
    r, _ = resolver
    with pytest.raises(DnsPermanent, match="null MX"):
        await r.mx("nullmx.test")
    with pytest.raises(DnsPermanent, match="no such domain"):
        await r.mx("missing.test")


async def test_servfail_is_temporary(resolver: tuple[Resolver, DnsServer]) -> None:
    r, _ = resolver
    with pytest.raises(DnsTemporary):
        await r.mx("broken.test")


async def test_answers_are_cached(resolver: tuple[Resolver, DnsServer]) -> None:
    r, srv = resolver
    await r.mx("multi.test")
    await r.mx("multi.test")
    assert srv.queries.count(("multi.test", "MX")) == 1


async def test_mx_hosts_learned_from_another_process_are_used_until_their_ttl(
    resolver: tuple[Resolver, DnsServer],
) -> None:
    r, srv = resolver
    assert r.known_mx("multi.test") is None
    hosts = await r.mx("multi.test")
    known = r.known_mx("multi.test")
    assert known is not None and known[0] == hosts and 0 < known[1] <= 60
    # Learned (what the scheduler sends with a lease): no lookup here.
    r.learn_mx("learned.test", [MxHost(5, "mx.learned.test")], 30)
    assert await r.mx("learned.test") == [MxHost(5, "mx.learned.test")]
    # A known answer is not replaced, and an expired one is looked up again.
    r.learn_mx("multi.test", [MxHost(1, "other.test")], 30)
    assert await r.mx("multi.test") == hosts
    r.learn_mx("gone.test", [MxHost(5, "mx.gone.test")], 0.05)
    await asyncio.sleep(0.1)
    assert r.known_mx("gone.test") is None
    with pytest.raises(DnsPermanent):
        await r.mx("gone.test")  # (not in the DNS server's records: NXDOMAIN)
    assert [q for q in srv.queries if q[1] == "MX"] == [("multi.test", "MX"), ("gone.test", "MX")]


class _Responder(asyncio.DatagramProtocol):
    """A nameserver that answers every query through `answer` (None: stays silent)."""

    def __init__(self, answer: Callable[[dns.message.Message], dns.message.Message | None]):
        self.answer = answer
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        response = self.answer(dns.message.from_wire(data))
        if response is not None and self.transport is not None:
            self.transport.sendto(response.to_wire(), addr)


async def _serve_udp(
    answer: Callable[[dns.message.Message], dns.message.Message | None],
    host: str = "127.0.0.1",
    port: int = 0,
) -> tuple[asyncio.DatagramTransport, int]:
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: _Responder(answer), local_addr=(host, port)
    )
    return transport, int(transport.get_extra_info("sockname")[1])


def _resolver(port: int, *nameservers: str, timeout: float = 2.0) -> Resolver:
    return Resolver(DnsConfig(nameservers=nameservers, port=port, timeout=Duration(timeout)))


def _answer_with(
    *records: tuple[str, int, str, str],
) -> Callable[[dns.message.Message], dns.message.Message]:
    """A responder answering any question with these (name, TTL, type, data) records."""

    def answer(q: dns.message.Message) -> dns.message.Message:
        r = dns.message.make_response(q)
        for name, ttl, rdtype, data in records:
            r.answer.append(dns.rrset.from_text(name, ttl, "IN", rdtype, data))
        return r

    return answer


async def test_cname_chain_is_followed_with_the_chains_ttl() -> None:
    answer = _answer_with(
        ("alias.test.", 300, "CNAME", "real.test."), ("real.test.", 40, "A", "127.0.0.7")
    )
    transport, port = await _serve_udp(answer)
    try:
        r = _resolver(port, "127.0.0.1")
        assert await r.addresses("alias.test") == ["127.0.0.7"]
        expires, _ = r._addr["alias.test"]
        assert expires - time.monotonic() <= 40, "the chain's shortest TTL"
    finally:
        transport.close()


@pytest.mark.parametrize(
    ("name", "rdtype"), [("evil.test", dns.rdatatype.MX), ("VICTIM.test", dns.rdatatype.A)]
)
async def test_an_answer_to_another_question_is_not_taken(
    name: str, rdtype: dns.rdatatype.RdataType
) -> None:
    """A reply whose question is not ours (a stray or spoofed datagram with our id: another
    name, or our name in other case but another type) is not an answer: the lookup fails
    temporarily instead of caching the wrong records."""

    def other_question(q: dns.message.Message) -> dns.message.Message:
        r = dns.message.make_response(dns.message.make_query(name, rdtype))
        r.id = q.id
        r.answer.append(dns.rrset.from_text("evil.test.", 60, "IN", "MX", "10 mx.evil.test."))
        return r

    transport, port = await _serve_udp(other_question)
    try:
        with pytest.raises(DnsTemporary, match="does not match the question"):
            await _resolver(port, "127.0.0.1", timeout=0.6).mx("victim.test")
    finally:
        transport.close()


async def test_only_the_records_asked_for_are_read() -> None:
    """Records of other names or types in the answer section are not taken for the answer."""

    noisy = _answer_with(
        ("other.test.", 60, "MX", "5 mx.other.test."),
        ("mixed.test.", 60, "TXT", '"v=spf1 -all"'),
        ("mixed.test.", 90, "MX", "10 mx.mixed.test."),
    )
    transport, port = await _serve_udp(noisy)
    try:
        r = _resolver(port, "127.0.0.1")
        assert await r.mx("mixed.test") == [MxHost(10, "mx.mixed.test")]
        expires, _ = r._mx["mixed.test"]
        assert 60 < expires - time.monotonic() <= 90, "the MX record's own TTL"
    finally:
        transport.close()


def _truncated(q: dns.message.Message) -> dns.message.Message:
    r = dns.message.make_response(q)
    r.flags |= dns.flags.TC
    return r


async def _serve_truncated_and_tcp(
    tcp: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> tuple[asyncio.DatagramTransport, asyncio.Server, int]:
    """A UDP server answering every question truncated, and `tcp` on the same port. The
    UDP port the system picks may be taken for TCP (by another test's connection), so
    pick again until both bind."""
    for _ in range(20):
        transport, port = await _serve_udp(_truncated)
        try:
            return transport, await asyncio.start_server(tcp, "127.0.0.1", port), port
        except OSError:
            transport.close()
    raise AssertionError("no port free for both UDP and TCP")


async def test_truncated_answer_is_asked_again_over_tcp() -> None:
    asked_over_tcp: list[str] = []

    async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        size = int.from_bytes(await reader.readexactly(2), "big")
        q = dns.message.from_wire(await reader.readexactly(size))
        asked_over_tcp.append(q.question[0].name.to_text())
        r = dns.message.make_response(q)
        if q.question[0].rdtype == dns.rdatatype.A:
            r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", "127.0.0.8"))
        wire = r.to_wire()
        writer.write(len(wire).to_bytes(2, "big") + wire)
        await writer.drain()
        writer.close()

    transport, server, port = await _serve_truncated_and_tcp(tcp)
    try:
        assert await _resolver(port, "127.0.0.1").addresses("big.test") == ["127.0.0.8"]
        assert asked_over_tcp and set(asked_over_tcp) == {"big.test."}
    finally:
        server.close()
        transport.close()


async def _hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def test_a_tcp_retry_cut_short_is_a_temporary_failure() -> None:
    """A truncated answer whose TCP retry the server closes at once (dnspython raises the
    builtin EOFError there) is a temporary failure, not an error out of the lookup."""

    transport, server, port = await _serve_truncated_and_tcp(_hang_up)
    try:
        r = _resolver(port, "127.0.0.1", timeout=0.6)
        with pytest.raises(DnsTemporary, match="MX lookup failed"):
            await r.mx("cut.test")
        with pytest.raises(DnsTemporary):
            await r.addresses("cut.test")
    finally:
        server.close()
        transport.close()


async def test_a_silent_nameserver_is_skipped_for_the_next() -> None:
    srv = DnsServer({"ok.test": [("MX", "10 mx.ok.test.")]})
    port = await srv.start("127.0.0.1")
    silent, _ = await _serve_udp(lambda q: None, "127.0.0.2", port)
    try:
        r = _resolver(port, "127.0.0.2", "127.0.0.1", timeout=3.0)
        assert await r.mx("ok.test") == [MxHost(10, "mx.ok.test")]
        # Only silent nameservers: a temporary failure once the lookup's time is spent.
        with pytest.raises(DnsTemporary, match="MX lookup failed"):
            await _resolver(port, "127.0.0.2", timeout=0.5).mx("ok.test")
    finally:
        silent.close()
        srv.close()


async def test_concurrent_lookups_share_one_socket() -> None:
    srv = DnsServer({f"h{i}.test": [("A", f"127.0.1.{i}")] for i in range(50)})
    port = await srv.start()
    try:
        r = _resolver(port, "127.0.0.1")
        found = await asyncio.gather(*(r.addresses(f"h{i}.test") for i in range(50)))
        assert found == [[f"127.0.1.{i}"] for i in range(50)]
        assert len(r._client._endpoints) == 1, "one socket per nameserver"
        assert len(srv.clients) == 1, "the lookups that started together opened one socket"
    finally:
        srv.close()


async def test_concurrent_lookups_of_one_name_ask_once(
    resolver: tuple[Resolver, DnsServer],
) -> None:
    """A site's connection loops open together: they share one lookup of its MX and of its
    host's addresses rather than asking the nameserver once each."""
    r, srv = resolver
    hosts = await asyncio.gather(*(r.mx("multi.test") for _ in range(5)))
    addresses = await asyncio.gather(*(r.addresses("a.multi.test") for _ in range(5)))
    assert hosts == [[MxHost(10, "a.multi.test"), MxHost(20, "b.multi.test")]] * 5
    assert addresses == [["127.0.0.2"]] * 5
    assert srv.queries.count(("multi.test", "MX")) == 1
    assert srv.queries.count(("a.multi.test", "A")) == 1
    assert srv.queries.count(("a.multi.test", "AAAA")) == 1
    # (gathered, not in a TaskGroup: the caller making the lookup fails first, and a
    # TaskGroup would cancel the others before the failure reached them)
    failed = await asyncio.gather(*(r.mx("broken.test") for _ in range(3)), return_exceptions=True)
    assert all(isinstance(e, DnsTemporary) for e in failed), failed


async def _each(r: Resolver, names: list[str]) -> tuple[list[object], list[str]]:
    """mx_many's answers in the order of `names`, and the order they came in."""
    came = [(domain, found) async for batch in r.mx_many(names) for domain, found in batch]
    found = dict(came)
    return [found[name] for name in names], [domain for domain, _ in came]


async def test_many_lookups_sent_together_answer_as_one_by_one(
    resolver: tuple[Resolver, DnsServer],
) -> None:
    """mx_many (the scheduler's lookups of a long tail's domains, sent together) gives what
    mx gives for each name, its failures included, and caches what it found."""
    r, srv = resolver
    names = ["multi.test", "implicit.test", "nullmx.test", "missing.test", "broken.test"]
    found, _ = await _each(r, names)
    one_by_one = _resolver(srv.port, "127.0.0.1")
    for name, got in zip(names, found, strict=True):
        try:
            expected: object = await one_by_one.mx(name)
        except (DnsPermanent, DnsTemporary) as exc:
            expected = exc
        if isinstance(expected, Exception):
            assert type(got) is type(expected) and str(got) == str(expected), (name, got)
        else:
            assert got == expected, (name, got)
    assert found[0] == [MxHost(10, "a.multi.test"), MxHost(20, "b.multi.test")]
    assert found[1] == [MxHost(0, "implicit.test")]
    asked = len(srv.queries)
    assert (await _each(r, ["multi.test", "implicit.test"]))[0] == found[:2]
    assert len(srv.queries) == asked, "cached answers were asked for again"
    assert len(srv.clients) == 2, "one socket per resolver"


async def test_a_name_a_batch_leaves_unanswered_is_asked_again_alone() -> None:
    """A batch's answers come as they arrive; a name its first try left unanswered within a
    third of the lookup's lifetime (a lost datagram) or truncated is asked again with what
    is left of it, and one that stays unanswered is a temporary failure: the batch's other
    names are not held back by it."""
    asked: list[str] = []

    def answer(q: dns.message.Message) -> dns.message.Message | None:
        name = q.question[0].name.to_text().rstrip(".")
        asked.append(name)
        if name == "never.test" or (name == "late.test" and asked.count(name) == 1):
            return None
        r = dns.message.make_response(q)
        r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "MX", f"10 mx.{name}."))
        return r

    transport, port = await _serve_udp(answer)
    try:
        r = _resolver(port, "127.0.0.1", timeout=1.5)
        found, order = await _each(r, ["a.test", "late.test", "never.test", "b.test"])
        assert found[0] == [MxHost(10, "mx.a.test")]
        assert found[1] == [MxHost(10, "mx.late.test")]
        assert isinstance(found[2], DnsTemporary), found[2]
        assert found[3] == [MxHost(10, "mx.b.test")]
        assert order == ["a.test", "b.test", "late.test", "never.test"]
        assert asked.count("a.test") == asked.count("b.test") == 1
        assert asked.count("late.test") == 2
    finally:
        transport.close()
    truncated, server, port = await _serve_truncated_and_tcp(_hang_up)
    try:
        with pytest.raises(DnsTemporary):
            await _resolver(port, "127.0.0.1", timeout=0.6).mx("cut.test")
        (cut,), _ = await _each(_resolver(port, "127.0.0.1", timeout=0.6), ["cut.test"])
        assert isinstance(cut, DnsTemporary), cut
    finally:
        server.close()
        truncated.close()


async def test_a_batch_left_unanswered_by_the_first_nameserver_goes_on_to_the_next() -> None:
    """Names a silent first nameserver left unanswered are asked of the next one, as a
    lookup of one name goes on (not of the silent one again, a third of the lifetime
    more)."""
    srv = DnsServer({"ok.test": [("MX", "10 mx.ok.test.")], "ok2.test": [("MX", "5 mx.ok2.test.")]})
    port = await srv.start("127.0.0.1")
    heard: list[str] = []

    def silent(q: dns.message.Message) -> None:
        heard.append(q.question[0].name.to_text())

    transport, _ = await _serve_udp(silent, "127.0.0.2", port)
    try:
        r = _resolver(port, "127.0.0.2", "127.0.0.1", timeout=3.0)
        found, _ = await _each(r, ["ok.test", "ok2.test"])
        assert found == [[MxHost(10, "mx.ok.test")], [MxHost(5, "mx.ok2.test")]]
        assert sorted(heard) == ["ok.test.", "ok2.test."], "the silent nameserver asked twice"
        assert sorted(q for q, _ in srv.queries) == ["ok.test", "ok2.test"]
    finally:
        transport.close()
        srv.close()
