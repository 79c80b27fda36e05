"""Deliverer behaviour against real DNS and SMTP: route overrides, VERP, List-Unsubscribe."""

from __future__ import annotations

import asyncio
import base64
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import dkim
import dns.resolver
import pytest

from deliverer.smtp import SmtpConnection
from sluice.nats_layout import connect
from sluice.resolver import parse_routes
from sluice.tenants import TenantStore
from tests.api import call
from tests.conftest import Stack, wait_for
from tests.servers import ScriptedSmtp, self_signed_context, start_smtp


@pytest.fixture
async def tls_smtp(tmp_path: Path) -> AsyncIterator[tuple[ScriptedSmtp, int]]:
    handler = ScriptedSmtp()
    server, port = await start_smtp(handler, self_signed_context(tmp_path))
    yield handler, port
    server.close()


@pytest.fixture
async def small_smtp() -> AsyncIterator[tuple[ScriptedSmtp, int]]:
    """A server that advertises SIZE 2000."""
    handler = ScriptedSmtp()
    server, port = await start_smtp(handler, data_size_limit=2000)
    yield handler, port
    server.close()


@pytest.fixture
def stack_overrides(
    smtp: tuple[ScriptedSmtp, int],
    tls_smtp: tuple[ScriptedSmtp, int],
    small_smtp: tuple[ScriptedSmtp, int],
) -> dict[str, dict[str, Any]]:
    return {
        "dns": {
            "routes": [
                f"routed.test=127.0.0.1:{smtp[1]}",
                f"tls.test=127.0.0.1:{tls_smtp[1]}",
                f"musttls.test=127.0.0.1:{tls_smtp[1]}",
                f"plain.test=127.0.0.1:{smtp[1]}",
                f"small.test=127.0.0.1:{small_smtp[1]}",
                f"slowdata.test=127.0.0.1:{smtp[1]}",
            ]
        },
        "deliverer": {
            "verp_domain": "bounces.acme.test",
            "require_tls_domains": ["musttls.test", "plain.test"],
            "data_timeout": "500ms",
        },
    }


def test_parse_routes() -> None:
    assert parse_routes(("Example.com=relay.example.net:2525", "*=smarthost")) == {
        "example.com": ("relay.example.net", 2525),
        "*": ("smarthost", None),
    }
    with pytest.raises(ValueError, match="domain=host"):
        parse_routes(("nonsense",))


async def test_route_override_and_verp(stack: Stack) -> None:
    # routed.test has no DNS records at all: only the route can deliver it.
    status, body, _ = await call(
        stack,
        "POST",
        "/v1/send",
        {"from": {"email": "a@acme.test"}, "to": [{"email": "x@routed.test"}], "text": "hi"},
    )
    assert status == 202, body
    (got,) = await wait_for(lambda: stack.smtp.to("x@routed.test"), what="routed mail")
    assert got.mail_from == f"bounce+{body['job_id']}-0@bounces.acme.test"


async def test_list_unsubscribe_on_bulk_only(stack: Stack) -> None:
    nc = await connect(stack.cfg, "test")
    store = TenantStore(nc.jetstream())
    tenant = await store.get_tenant("acme")
    assert tenant is not None
    tenant.unsubscribe_url = "https://acme.test/unsub?u={{recipient}}&m={{message_id}}"
    await store.put_tenant(tenant)
    await nc.close()
    for tier, to in (("bulk", "news@mail.test"), ("transactional", "receipt@mail.test")):
        status, _, _ = await call(
            stack,
            "POST",
            "/v1/send",
            {"from": {"email": "a@acme.test"}, "to": [{"email": to}], "text": "x", "tier": tier},
        )
        assert status == 202
    (news,) = await wait_for(lambda: stack.smtp.to("news@mail.test"), what="bulk mail")
    (receipt,) = await wait_for(lambda: stack.smtp.to("receipt@mail.test"), what="receipt")
    link = news.message["List-Unsubscribe"]
    assert link.startswith("<https://acme.test/unsub?u=news%40mail.test&m=job_")
    assert news.message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert receipt.message["List-Unsubscribe"] is None


async def test_starttls_opportunistic_and_required(
    stack: Stack, tls_smtp: tuple[ScriptedSmtp, int]
) -> None:
    tls_server, _ = tls_smtp
    for to in ("a@tls.test", "b@musttls.test", "c@plain.test", "d@routed.test"):
        status, _, _ = await call(
            stack,
            "POST",
            "/v1/send",
            {"from": {"email": "a@acme.test"}, "to": [{"email": to}], "text": "x"},
        )
        assert status == 202
    (opportunistic,) = await wait_for(lambda: tls_server.to("a@tls.test"), what="TLS mail")
    (required,) = await wait_for(lambda: tls_server.to("b@musttls.test"), what="required")
    (plain,) = await wait_for(lambda: stack.smtp.to("d@routed.test"), what="plain mail")
    assert opportunistic.tls and required.tls and not plain.tls
    # plain.test requires TLS but its server does not offer it: deferred, never sent.
    deferred = await wait_for(
        lambda: [
            c
            for c in stack.hooks.of_type("message.deferred")
            if c.verified and c.verified["data"]["recipient"] == "c@plain.test"
        ],
        what="a deferral for the server without STARTTLS",
    )
    assert deferred
    assert stack.smtp.to("c@plain.test") == []


@pytest.fixture
def dkim_key(tmp_path: Path) -> tuple[str, str]:
    """(private key PEM, public key base64 DER) made with openssl."""
    key = tmp_path / "dkim.pem"
    subprocess.run(
        ["openssl", "genrsa", "-traditional", "-out", str(key), "2048"],
        check=True,
        capture_output=True,
    )
    public = subprocess.run(
        ["openssl", "rsa", "-in", str(key), "-pubout", "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    return key.read_text(), base64.b64encode(public).decode()


async def test_dkim_signature_verifies_at_the_receiver(
    stack: Stack, dns_server: Any, dkim_key: tuple[str, str]
) -> None:
    pem, public = dkim_key
    txt = f"v=DKIM1; k=rsa; p={public}"
    dns_server.records["s1._domainkey.acme.test"] = [
        ("TXT", " ".join(f'"{txt[i : i + 200]}"' for i in range(0, len(txt), 200)))
    ]
    nc = await connect(stack.cfg, "test")
    store = TenantStore(nc.jetstream())
    tenant = await store.get_tenant("acme")
    assert tenant is not None
    tenant.dkim_keys.add(domain="acme.test", selector="s1", private_key_pem=pem)
    await store.put_tenant(tenant)
    await nc.close()

    status, _, _ = await call(
        stack,
        "POST",
        "/v1/send",
        {
            "from": {"email": "a@acme.test"},
            "to": [{"email": "signed@mail.test"}],
            "subject": "signed",
            "text": "hello",
        },
    )
    assert status == 202
    (got,) = await wait_for(lambda: stack.smtp.to("signed@mail.test"), what="signed mail")
    assert got.message["DKIM-Signature"] is not None

    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = dns_server.port

    def lookup(name: bytes, timeout: int = 5) -> bytes:
        answer = resolver.resolve(name.decode().rstrip("."), "TXT")
        return b"".join(b"".join(r.strings) for r in answer)

    # The receiver's check, with the public key from the test DNS server.
    assert await asyncio.to_thread(dkim.verify, got.data, dnsfunc=lookup) is True
    tampered = got.data.replace(b"hello", b"jello")
    assert await asyncio.to_thread(dkim.verify, tampered, dnsfunc=lookup) is False


async def test_size_limit_is_respected_and_data_timeout_defers(
    stack: Stack, small_smtp: tuple[ScriptedSmtp, int]
) -> None:
    small, _ = small_smtp
    stack.smtp.data_delay["slowdata.test"] = 2.0
    for to, text in (
        ("big@small.test", "x" * 5000),
        ("fits@small.test", "short"),
        ("slow@slowdata.test", "x"),
    ):
        status, _, _ = await call(
            stack,
            "POST",
            "/v1/send",
            {"from": {"email": "a@acme.test"}, "to": [{"email": to}], "text": text},
        )
        assert status == 202
    await wait_for(lambda: small.to("fits@small.test"), what="the message within SIZE")
    bounced = await wait_for(
        lambda: [
            c
            for c in stack.hooks.of_type("message.bounced")
            if c.verified and c.verified["data"]["recipient"] == "big@small.test"
        ],
        what="the oversize bounce",
    )
    assert bounced[0].verified and bounced[0].verified["data"]["bounce_category"] == (
        "message_too_big"
    )
    assert small.rcpt_attempts["big@small.test"] == 0, "an oversize message was offered"
    deferred = await wait_for(
        lambda: [
            c
            for c in stack.hooks.of_type("message.deferred")
            if c.verified and c.verified["data"]["recipient"] == "slow@slowdata.test"
        ],
        what="a DATA timeout deferral",
    )
    assert deferred


async def test_a_connection_knows_whether_it_is_encrypted(
    tls_smtp: tuple[ScriptedSmtp, int], small_smtp: tuple[ScriptedSmtp, int]
) -> None:
    """What decides whether a connection may carry mail for another domain of its site that
    requires TLS (Deliverer._serves)."""
    tls = SmtpConnection("mx.tls.test", "127.0.0.1", tls_smtp[1], "sluice.test", 5.0, 5.0)
    plain = SmtpConnection("mx.plain.test", "127.0.0.1", small_smtp[1], "sluice.test", 5.0, 5.0)
    for conn in (tls, plain):
        await conn.open()
        reply = await conn.send("a@acme.test", "x@tls.test", b"Subject: t\r\n\r\nx\r\n")
        assert reply.code == 250
    try:
        assert tls.tls and not plain.tls
        assert tls_smtp[0].received[0].tls
    finally:
        await tls.close()
        await plain.close()
    assert not tls.tls, "closed"
