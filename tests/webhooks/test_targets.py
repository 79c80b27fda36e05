"""Webhook targets: loopback, private and link-local addresses are refused unless allowed,
and the check is on the address actually connected to. The endpoint's name resolves through a
real DNS server whose answer changes (DNS rebinding): public when the endpoint is registered,
loopback when the event is posted."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
from aiohttp import web

from sluice.config import Config, ConfigError, DnsConfig, NatsConfig, WebhooksConfig
from sluice.devdns import DnsServer
from sluice.nats_layout import connect
from sluice.natsserver import NatsServer
from sluice.tenants import new_webhook_secret
from sluice.v1 import messages_pb2, tenant_pb2
from tests.servers import start_hook_server
from webhooks.sender import TargetPolicy, WebhookSender, client_session

NAME = "hooks.rebind.test"


@pytest.fixture
async def hook() -> AsyncIterator[tuple[list[bytes], int]]:
    received: list[bytes] = []

    async def handler(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.Response(status=204)

    runner, url = await start_hook_server(handler)
    port = urlsplit(url).port
    assert port is not None
    yield received, port
    await runner.cleanup()


async def post_once(nats_server: NatsServer, cfg: Config, url: str) -> bool:
    """POST one event to `url` through a WebhookSender; True when it is done with it."""
    nc = await connect(Config(nats=NatsConfig(url=nats_server.url)), "test")
    try:
        async with client_session(cfg) as session:
            sender = WebhookSender(cfg, nc.jetstream(), session)
            endpoint = tenant_pb2.WebhookEndpoint(id="e1", url=url, secrets=[new_webhook_secret()])
            event = messages_pb2.Event(event_id="evt_1", tenant_id="acme")
            return await sender.post(endpoint, event, b"{}")
    finally:
        await nc.close()


async def test_a_name_rebound_to_loopback_is_refused_at_connect_time(
    nats_server: NatsServer, hook: tuple[list[bytes], int]
) -> None:
    received, port = hook
    dns = DnsServer({NAME: [("A", "93.184.216.34")]}, ttl=0)
    await dns.start()
    try:
        # While the endpoint is registered the name is public: a check then passes ...
        assert TargetPolicy(WebhooksConfig()).allows("93.184.216.34")
        # ... and it is rebound to loopback before the event is posted.
        dns.records[NAME] = [("A", "127.0.0.1")]
        url = f"http://{NAME}:{port}/hook"
        cfg = Config(dns=DnsConfig(nameservers=("127.0.0.1",), port=dns.port))
        done = await post_once(nats_server, cfg, url)
        assert done, "a refused target is final, not retried"
        assert received == [], "the POST reached a loopback address"
        assert (NAME, "A") in dns.queries, "the connection's own lookup was not the checked one"

        # The same name, the same server, with loopback allowed: the POST arrives, so the
        # refusal above came from the policy, not from an unreachable name.
        cfg = Config(
            dns=DnsConfig(nameservers=("127.0.0.1",), port=dns.port),
            webhooks=WebhooksConfig(allowed_networks=("127.0.0.0/8",)),
        )
        assert await post_once(nats_server, cfg, url)
        assert received == [b"{}"]
    finally:
        dns.close()


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.0.0.5",
        "192.168.1.1",
        "169.254.169.254",
        "::1",
        "::ffff:127.0.0.1",
        "fc00::1",
        "fec0::1",  # site-local
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "::7f00:1",  # IPv4-compatible 127.0.0.1
    ],
)
def test_non_public_addresses_are_refused_unless_allowed(address: str) -> None:
    assert not TargetPolicy(WebhooksConfig()).allows(address)
    assert TargetPolicy(WebhooksConfig(allow_private_targets=True)).allows(address)


def test_allowed_networks_open_only_themselves() -> None:
    policy = TargetPolicy(WebhooksConfig(allowed_networks=("10.1.2.0/24",)))
    assert policy.allows("10.1.2.9") and not policy.allows("10.1.3.9")
    assert policy.allows("8.8.8.8")
    assert policy.allows("64:ff9b::808:808"), "NAT64 of a public address is public"
    with pytest.raises(ConfigError, match="allowed_networks"):
        TargetPolicy(WebhooksConfig(allowed_networks=("not-a-network",)))


async def test_literal_loopback_urls_are_refused(
    nats_server: NatsServer, hook: tuple[list[bytes], int]
) -> None:
    received, port = hook
    for url in (
        f"http://127.0.0.1:{port}/hook",
        f"http://[::ffff:127.0.0.1]:{port}/hook",
        # Names to urllib, but IDNA makes them the literal 127.0.0.1 for aiohttp.
        f"http://①②⑦.0.0.1:{port}/hook",
        f"http://127。0。0。1:{port}/hook",
    ):
        assert await post_once(nats_server, Config(), url), "a refused target is final"
    assert received == []
