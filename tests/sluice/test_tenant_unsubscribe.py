"""A tenant's unsubscribe_url is checked when the tenant is written (TenantStore.put_tenant,
the one path the CLI and everything else use): a bounded length, so the List-Unsubscribe
line fits RFC 5322's 998 characters, an https, http or mailto scheme, nothing that would
break the header. A refused tenant is not stored; the error names the field."""

from __future__ import annotations

import pytest

from sluice.config import Config, NatsConfig
from sluice.nats_layout import connect, ensure_layout
from sluice.natsserver import NatsServer
from sluice.tenants import MAX_UNSUBSCRIBE_URL, TenantStore, unsubscribe_url_problem
from sluice.v1 import tenant_pb2

GOOD = [
    "",
    "https://acme.test/unsub?u={{recipient}}&m={{message_id}}",
    "http://acme.test/u",
    "HTTPS://acme.test/u",
    "mailto:unsub@acme.test?subject=unsubscribe",
    "https://acme.test/" + "x" * (MAX_UNSUBSCRIBE_URL - len("https://acme.test/")),
]
BAD = [
    ("https://acme.test/" + "x" * 2000, f"at most {MAX_UNSUBSCRIBE_URL}"),
    ("https://acme.test/" + "x" * (MAX_UNSUBSCRIBE_URL + 1 - 18), f"at most {MAX_UNSUBSCRIBE_URL}"),
    ("javascript:alert(1)", "https, http or mailto"),
    ("ftp://acme.test/u", "https, http or mailto"),
    ("acme.test/unsub", "https, http or mailto"),
    ("https:///path-only", "needs a host"),
    ("mailto:", "needs an address"),
    ("https://acme.test/u>, <https://evil.test/", "ASCII without spaces"),
    ("https://acme.test/u\r\nBcc: x@evil.test", "ASCII without spaces"),
    ("https://acme.test/ü", "ASCII without spaces"),
    ("https://[::1/u", "not a valid URL"),
]


@pytest.mark.parametrize("url", GOOD)
def test_good_urls(url: str) -> None:
    assert unsubscribe_url_problem(url) is None


@pytest.mark.parametrize(("url", "why"), BAD)
def test_bad_urls(url: str, why: str) -> None:
    problem = unsubscribe_url_problem(url)
    assert problem is not None and why in problem, problem


async def test_put_tenant_refuses_a_bad_url_and_stores_nothing(nats_server: NatsServer) -> None:
    cfg = Config(nats=NatsConfig(url=nats_server.url))
    nc = await connect(cfg, "test")
    try:
        js = nc.jetstream()
        await ensure_layout(js, cfg)
        store = TenantStore(js)
        for i, (url, why) in enumerate(BAD):
            with pytest.raises(ValueError, match=r"^unsubscribe_url ") as err:
                await store.put_tenant(tenant_pb2.Tenant(tenant_id=f"t{i}", unsubscribe_url=url))
            assert why in str(err.value)
            assert await store.get_tenant(f"t{i}") is None
        good = tenant_pb2.Tenant(tenant_id="good", unsubscribe_url=GOOD[1])
        await store.put_tenant(good)
        assert await store.get_tenant("good") == good
        # An update to a bad URL leaves the stored tenant as it was.
        with pytest.raises(ValueError, match="unsubscribe_url"):
            await store.put_tenant(tenant_pb2.Tenant(tenant_id="good", unsubscribe_url=BAD[0][0]))
        assert await store.get_tenant("good") == good
    finally:
        await nc.close()
