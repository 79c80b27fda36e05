"""The webhook worker: consumes EVENTS and POSTs each to the tenant's subscribed endpoints.

Each event is first fanned out into one WebhookDelivery per subscribed endpoint (stream
WEBHOOKS), so every (event, endpoint) pair is retried on its own and a slow or failing
endpoint never delays another: at most `per_endpoint_concurrency` POSTs per endpoint are in
flight, the rest wait their turn without holding a worker. A 2xx is success. Timeouts, 408,
429 and 5xx are retried on a ladder (a NAK with delay) until the webhook horizon, then
dead-lettered (replayable: webhooks/deadletters.py); other 4xx stop. Loopback and private
targets are refused unless allowed, on the address actually connected to (`GuardedResolver`).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import socket
import time

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from yarl import URL

from sluice import jsonpb, names
from sluice.config import Config, ConfigError, DnsConfig, WebhooksConfig
from sluice.consume import consume
from sluice.health import ServiceHealth, nats_problems
from sluice.nats_layout import connect, ensure_layout
from sluice.resolver import DnsError, Resolver
from sluice.retry import next_delay
from sluice.telemetry import TRACE_HEADERS, count_webhook_post, http_client_trace, remote_parent
from sluice.tenants import TenantCache, TenantStore
from sluice.v1 import messages_pb2, tenant_pb2
from webhooks import deadletters
from webhooks.signing import signature_headers

__all__ = ["WebhookSender", "event_body", "serve"]

log = logging.getLogger(__name__)


class TargetRefused(Exception):
    """The endpoint resolves to an address webhooks may not reach."""


def event_body(event: messages_pb2.Event) -> bytes:
    """The JSON body: {"type": "message.<type>", "timestamp": ..., "data": <event>}."""
    data = jsonpb.to_dict(event)
    return json.dumps(
        {
            "type": f"message.{names.event_token(event.type)}",
            "timestamp": data.get("timestamp"),
            "data": data,
        },
        separators=(",", ":"),
    ).encode()


_EMBEDS_IPV4 = [
    ipaddress.IPv6Network("64:ff9b::/96"),
    ipaddress.IPv6Network("64:ff9b:1::/48"),
    ipaddress.IPv6Network("::/96"),
]


class TargetPolicy:
    """Which addresses webhooks may reach: public ones, plus `[webhooks] allowed_networks`,
    or everything with `allow_private_targets`."""

    def __init__(self, cfg: WebhooksConfig) -> None:
        self.allow_all = cfg.allow_private_targets
        try:
            self._networks = [ipaddress.ip_network(n, strict=False) for n in cfg.allowed_networks]
        except ValueError as exc:
            raise ConfigError(f"[webhooks] allowed_networks: {exc}") from exc

    def allows(self, address: str) -> bool:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address)
        if isinstance(ip, ipaddress.IPv6Address):
            # IPv6 forms that carry an IPv4 address are judged by it: mapped (::ffff:a.b.c.d),
            # 6to4, Teredo, NAT64 (64:ff9b::/96, 64:ff9b:1::/48) and IPv4-compatible (::/96).
            if ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            elif ip.sixtofour is not None:
                ip = ip.sixtofour
            elif ip.teredo is not None:
                ip = ip.teredo[1]
            elif any(ip in n for n in _EMBEDS_IPV4):
                ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
            elif ip.is_site_local:  # fec0::/10, deprecated but still routed privately
                return self.allow_all or any(ip in n for n in self._networks)
        return self.allow_all or ip.is_global or any(ip in n for n in self._networks)


def check_url(url: str, policy: TargetPolicy) -> None:
    """Refuse what needs no lookup: other schemes, and literal addresses (the connector does
    not resolve those, so `GuardedResolver` never sees them). The host is read the way
    aiohttp reads it (yarl, with IDNA): "①②⑦.0.0.1" or "127。0。0。1" are names to a plain
    parser but the literal 127.0.0.1 to the connector."""
    try:
        parsed = URL(url)
    except ValueError as exc:
        raise TargetRefused(f"not a valid URL: {url}") from exc
    host = parsed.raw_host
    if parsed.scheme not in ("http", "https") or not host:
        raise TargetRefused(f"not an http(s) URL: {url}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return  # a name: checked by GuardedResolver on the addresses it resolves to
    if not policy.allows(host):
        raise TargetRefused(f"{host} is not a public address")


class GuardedResolver(AbstractResolver):
    """The webhook client's resolver: it hands the connector only addresses the policy
    allows, so the check is on the address actually connected to. Checking a name first and
    letting the client resolve it again would let a DNS answer that changes in between (DNS
    rebinding) point a webhook at loopback or the internal network."""

    def __init__(self, policy: TargetPolicy, dns: DnsConfig) -> None:
        self._policy = policy
        # [dns] nameservers set: the same resolver as MX lookups; else the system's
        # (getaddrinfo, so /etc/hosts applies).
        self._dns = Resolver(dns) if dns.nameservers else None
        self._system = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if self._dns is None:
            found = await self._system.resolve(host, port, family)
        else:
            try:
                addresses = await self._dns.addresses(host)
            except DnsError as exc:
                raise OSError(str(exc)) from exc
            found = [
                ResolveResult(
                    hostname=host,
                    host=a,
                    port=port,
                    family=socket.AF_INET6 if ":" in a else socket.AF_INET,
                    proto=0,
                    flags=socket.AI_NUMERICHOST,
                )
                for a in addresses
            ]
        allowed = [r for r in found if self._policy.allows(r["host"])]
        if not allowed:
            shown = ", ".join(sorted({r["host"] for r in found}))
            raise TargetRefused(f"{host} resolves only to non-public addresses ({shown})")
        return allowed

    async def close(self) -> None:
        await self._system.close()


def client_session(cfg: Config) -> aiohttp.ClientSession:
    """The HTTP client for webhook POSTs, with the target policy in its resolver."""
    policy = TargetPolicy(cfg.webhooks)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(resolver=GuardedResolver(policy, cfg.dns)),
        # A span per POST (traceparent sent along) and the success/failure counts.
        trace_configs=[http_client_trace(count_webhook_post)],
    )


class WebhookSender:
    def __init__(self, cfg: Config, js: JetStreamContext, session: aiohttp.ClientSession) -> None:
        self._cfg = cfg
        self._js = js
        self._tenants = TenantCache(TenantStore(js), 5.0)
        self._http = session
        self._in_flight: dict[str, int] = {}
        self._policy = TargetPolicy(cfg.webhooks)
        # Batching endpoints: deliveries gathering for the next POST, its timer, the
        # endpoint as last read, and the batch POSTs in flight.
        self._gathering: dict[str, list[tuple[Msg, messages_pb2.WebhookDelivery]]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._endpoints: dict[str, tenant_pb2.WebhookEndpoint] = {}
        self._batches: set[asyncio.Task[None]] = set()
        self._posting: dict[str, int] = {}  # batch POSTs in flight per endpoint

    async def post(
        self, endpoint: tenant_pb2.WebhookEndpoint, event: messages_pb2.Event, body: bytes
    ) -> bool:
        """POST one event; True when done (delivered, or failed for good), False to retry."""
        return await self._post(endpoint, event.event_id, body, event.event_id)

    async def _post(
        self, endpoint: tenant_pb2.WebhookEndpoint, webhook_id: str, body: bytes, what: str
    ) -> bool:
        try:
            check_url(endpoint.url, self._policy)
        except TargetRefused as exc:
            log.warning("webhook %s to %s refused: %s", what, endpoint.url, exc)
            return True
        headers = signature_headers(list(endpoint.secrets), webhook_id, int(time.time()), body)
        headers["content-type"] = "application/json"
        try:
            async with self._http.post(
                endpoint.url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self._cfg.webhooks.timeout),
                allow_redirects=False,
            ) as resp:
                status = resp.status
        except TargetRefused as exc:
            log.warning("webhook %s to %s refused: %s", what, endpoint.url, exc)
            return True
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.info("webhook %s to %s failed: %r", what, endpoint.url, exc)
            return False
        if 200 <= status < 300:
            log.info("webhook %s to %s: %d", what, endpoint.url, status)
            return True
        retry = status in (408, 429) or status >= 500
        log.info(
            "webhook %s to %s: %d (%s)",
            what,
            endpoint.url,
            status,
            "will retry" if retry else "giving up",
        )
        return not retry

    async def fan_out(self, msg: Msg) -> None:
        """One EVENTS message in: one WebhookDelivery per subscribed endpoint out."""
        try:
            event = messages_pb2.Event.FromString(msg.data)
        except Exception:
            await msg.term()
            return
        tenant = await self._tenants.get(event.tenant_id)
        # The event's trace context passes through unchanged to each endpoint's delivery.
        trace_context = {k: v for k, v in (msg.headers or {}).items() if k in TRACE_HEADERS}
        for e in tenant.webhooks if tenant else []:
            if e.event_types and event.type not in e.event_types:
                continue
            delivery = messages_pb2.WebhookDelivery(event=event, endpoint_id=e.id)
            await self._js.publish(
                names.webhook_subject(event.tenant_id, e.id),
                delivery.SerializeToString(),
                stream=names.WEBHOOKS_STREAM,
                headers={"Nats-Msg-Id": f"{event.event_id}.{e.id}", **trace_context},
            )
        await msg.ack()

    async def deliver(self, msg: Msg) -> None:
        """POST one event to one endpoint; retried on its own ladder until the horizon."""
        try:
            delivery = messages_pb2.WebhookDelivery.FromString(msg.data)
        except Exception:
            await msg.term()
            return
        event = delivery.event
        tenant = await self._tenants.get(event.tenant_id)
        endpoint = next(
            (e for e in (tenant.webhooks if tenant else []) if e.id == delivery.endpoint_id), None
        )
        if endpoint is None:  # the endpoint was removed since
            await msg.ack()
            return
        key = f"{event.tenant_id}/{endpoint.id}"
        if endpoint.batch_size > 1:
            await self._batch(key, endpoint, msg, delivery)
            return
        if self._in_flight.get(key, 0) >= self._cfg.webhooks.per_endpoint_concurrency:
            await msg.nak(delay=1.0)  # its turn comes; it does not hold a worker meanwhile
            return
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        try:
            # The POST's span continues the trace of whoever published the event.
            with remote_parent(msg.headers):
                done = await self.post(endpoint, event, event_body(event))
        finally:
            self._in_flight[key] -= 1
        await self._settle(msg, delivery, done, endpoint.url)

    async def _settle(
        self, msg: Msg, delivery: messages_pb2.WebhookDelivery, done: bool, url: str
    ) -> None:
        """Ack a finished delivery; else retry it on the ladder, or dead-letter it past the
        horizon."""
        if done:
            await msg.ack()
            return
        event = delivery.event
        since = max(event.timestamp.ToNanoseconds(), delivery.replayed_at.ToNanoseconds())
        age = time.time() - since / 1e9
        if age > self._cfg.webhooks.horizon:
            # Dead letter first, then TERM: a crash in between repeats, never loses.
            await deadletters.dead_letter(self._js, delivery)
            await msg.term()
            log.warning("webhook %s to %s: horizon passed, dead-lettered", event.event_id, url)
            return
        await msg.nak(delay=next_delay(age, self._cfg.webhooks.ladder, 0.1))

    async def _batch(
        self,
        key: str,
        endpoint: tenant_pb2.WebhookEndpoint,
        msg: Msg,
        delivery: messages_pb2.WebhookDelivery,
    ) -> None:
        """Gather the delivery into the endpoint's next batch and return at once (the batch
        settles every message in it). At most `per_endpoint_concurrency` batches' worth of
        messages are held per endpoint; more are handed back, as for single POSTs."""
        room = endpoint.batch_size * self._cfg.webhooks.per_endpoint_concurrency
        if self._in_flight.get(key, 0) >= room:
            await msg.nak(delay=1.0)
            return
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        self._endpoints[key] = endpoint
        gathering = self._gathering.setdefault(key, [])
        gathering.append((msg, delivery))
        if len(gathering) >= endpoint.batch_size:
            self._start_batch(key, endpoint)
        elif len(gathering) == 1:
            loop = asyncio.get_running_loop()
            # The endpoint as last read when the timer fires (its URL or secrets may change).
            self._timers[key] = loop.call_later(
                self._cfg.webhooks.batch_wait,
                lambda: self._start_batch(key, self._endpoints[key]),
            )

    def _start_batch(
        self, key: str, endpoint: tenant_pb2.WebhookEndpoint, force: bool = False
    ) -> None:
        """POST the endpoint's next batch, unless `per_endpoint_concurrency` batch POSTs are
        in flight already: then it keeps gathering and goes when one of them ends."""
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        gathering = self._gathering.get(key, [])
        if not gathering:
            return
        if not force and self._posting.get(key, 0) >= self._cfg.webhooks.per_endpoint_concurrency:
            return
        batch = gathering[: max(1, endpoint.batch_size)]
        del gathering[: len(batch)]
        if not gathering:
            self._gathering.pop(key, None)
        self._posting[key] = self._posting.get(key, 0) + 1
        task = asyncio.create_task(self._post_batch(key, endpoint, batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _post_batch(
        self,
        key: str,
        endpoint: tenant_pb2.WebhookEndpoint,
        batch: list[tuple[Msg, messages_pb2.WebhookDelivery]],
    ) -> None:
        ids = [d.event.event_id for _, d in batch]
        webhook_id = "batch_" + hashlib.sha256("\n".join(ids).encode()).hexdigest()[:32]
        body = b"[" + b",".join(event_body(d.event) for _, d in batch) + b"]"
        try:
            done = await self._post(endpoint, webhook_id, body, f"{webhook_id} ({len(ids)})")
            for msg, delivery in batch:
                await self._settle(msg, delivery, done, endpoint.url)
        finally:
            self._in_flight[key] -= len(batch)
            self._posting[key] -= 1
            if self._gathering.get(key):  # what gathered meanwhile goes next
                self._start_batch(key, self._endpoints[key])

    async def close(self, drain: float) -> None:
        """Post what is still gathering, and wait (up to `drain` seconds) for batches in flight;
        what does not finish is not acked and comes back from JetStream."""
        for key in list(self._gathering):
            while self._gathering.get(key):
                self._start_batch(key, self._endpoints[key], force=True)
        if self._batches:
            _, cut = await asyncio.wait(set(self._batches), timeout=drain)
            for task in cut:
                task.cancel()
            await asyncio.gather(*cut, return_exceptions=True)


async def ensure_consumers(js: JetStreamContext) -> None:
    await js.add_consumer(
        names.EVENTS_STREAM,
        js_api.ConsumerConfig(
            durable_name=names.WEBHOOKS_CONSUMER,
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=60.0,
            max_ack_pending=10_000,
            max_deliver=-1,
            deliver_policy=js_api.DeliverPolicy.ALL,
        ),
    )
    await js.add_consumer(
        names.WEBHOOKS_STREAM,
        js_api.ConsumerConfig(
            durable_name=names.WEBHOOK_DELIVERY_CONSUMER,
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=120.0,
            max_ack_pending=100_000,
            max_deliver=-1,
        ),
    )


async def serve(cfg: Config, stop: asyncio.Event) -> None:
    nc = await connect(cfg, "sluice-webhooks")
    js = nc.jetstream()
    await ensure_layout(js, cfg)
    await ensure_consumers(js)
    events = await js.pull_subscribe_bind(names.WEBHOOKS_CONSUMER, names.EVENTS_STREAM)
    deliveries = await js.pull_subscribe_bind(
        names.WEBHOOK_DELIVERY_CONSUMER, names.WEBHOOKS_STREAM
    )
    async with client_session(cfg) as session:
        sender = WebhookSender(cfg, js, session)
        health = ServiceHealth(
            "webhooks",
            lambda: nats_problems(
                nc,
                [
                    (names.EVENTS_STREAM, names.WEBHOOKS_CONSUMER),
                    (names.WEBHOOKS_STREAM, names.WEBHOOK_DELIVERY_CONSUMER),
                ],
            ),
        )
        drain = cfg.shutdown.drain_timeout
        log.info("webhooks: running")
        try:
            await health.start(cfg.telemetry, stop)
            await asyncio.gather(
                consume(events, sender.fan_out, 64, stop, "webhook fan-out", drain=drain),
                consume(
                    deliveries,
                    sender.deliver,
                    cfg.webhooks.concurrency,
                    stop,
                    "webhook delivery",
                    drain=drain,
                ),
            )
            await sender.close(drain)
        finally:
            await health.close()
            await nc.close()
