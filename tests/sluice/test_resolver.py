"""The shared resolver against a real DNS server on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator

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
