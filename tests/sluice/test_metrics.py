"""Metrics as Prometheus scrapes them: after real deliveries in-process, prometheus_client's
default REGISTRY (what /metrics serves) holds the per-tier counters, a latency histogram with
one observation per delivery, webhook POST outcomes and the scheduler's gauges.

The meter provider is process-wide and other tests in this process deliver mail too, so the
counters are compared before and after."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import aiohttp
import grpc
import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sluice.v1 import scheduler_pb2, scheduler_pb2_grpc
from tests.conftest import Stack, wait_for

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

# Labels the OpenTelemetry exporter adds to every series; the tests ignore them.
_SCOPE_LABELS = {"otel_scope_name", "otel_scope_version", "otel_scope_schema_url"}


def scrape() -> Samples:
    """Every sample of the default registry, by name and labels (scope labels dropped)."""
    out: Samples = defaultdict(float)
    for family in text_string_to_metric_families(generate_latest(REGISTRY).decode()):
        for s in family.samples:
            labels = frozenset((k, v) for k, v in s.labels.items() if k not in _SCOPE_LABELS)
            out[(s.name, labels)] += s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def send(stack: Stack, tier: str, *to: str) -> None:
    body: dict[str, Any] = {
        "from": {"email": "alerts@acme.test"},
        "to": [{"email": a} for a in to],
        "subject": "metrics",
        "text": "hello",
        "tier": tier,
    }
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{stack.http}/v1/send", json=body, headers={"Authorization": f"Bearer {stack.api_key}"}
        ) as resp,
    ):
        assert resp.status == 202, await resp.text()


async def test_counters_and_latency_after_deliveries(stack: Stack) -> None:
    before = scrape()
    stack.smtp.script["slow@mail.test"] = ["450 4.2.1 Mailbox busy"]
    stack.smtp.script["gone@mail.test"] = ["550 5.1.1 User unknown"]
    await send(stack, "critical", "bob@mail.test", "carol@other.test")  # 2 delivered
    await send(stack, "transactional", "slow@mail.test")  # deferred once, then delivered
    await send(stack, "transactional", "gone@mail.test")  # bounced: suppressed from now on
    await wait_for(lambda: stack.hooks.of_type("message.bounced"), what="the bounce")
    await send(stack, "transactional", "gone@mail.test")  # suppressed
    await wait_for(
        lambda: (
            len(stack.hooks.of_type("message.delivered")) == 3
            and stack.hooks.of_type("message.suppressed")
        ),
        what="3 delivered and 1 suppressed webhooks",
    )
    expected = {
        ("sluice_messages_accepted_total", "critical"): 2,
        ("sluice_messages_accepted_total", "transactional"): 3,
        ("sluice_messages_delivered_total", "critical"): 2,
        ("sluice_messages_delivered_total", "transactional"): 1,
        ("sluice_messages_deferred_total", "transactional"): 1,
        ("sluice_messages_bounced_total", "transactional"): 1,
        ("sluice_messages_suppressed_total", "transactional"): 1,
        ("sluice_messages_bounced_total", "critical"): 0,
        ("sluice_messages_failed_total", "transactional"): 0,
    }

    def counted() -> Samples | None:
        after = scrape()
        ok = all(delta(before, after, n, tier=t) == v for (n, t), v in expected.items())
        # Every POST the receiver answered (204) is a success; none failed.
        ok = ok and delta(before, after, "sluice_webhook_posts_total", outcome="success") == len(
            stack.hooks.calls
        )
        return after if ok else None

    after = await wait_for(counted, what=f"the counters to reach {expected}")
    assert delta(before, after, "sluice_webhook_posts_total", outcome="failure") == 0
    for tier in ("critical", "transactional"):
        delivered = delta(before, after, "sluice_messages_delivered_total", tier=tier)
        observed = delta(before, after, "sluice_delivery_latency_seconds_count", tier=tier)
        assert observed == delivered, tier
        assert delta(before, after, "sluice_delivery_latency_seconds_sum", tier=tier) > 0
        # Cumulative buckets: the +Inf bucket holds every observation.
        assert (
            delta(before, after, "sluice_delivery_latency_seconds_bucket", tier=tier, le="+Inf")
            == delivered
        )
    # The deferred message waited out its ladder step (1 s) before it was delivered.
    assert bucket(after, "transactional", 1.0) - bucket(before, "transactional", 1.0) == 0


def bucket(samples: Samples, tier: str, le: float) -> float:
    """The latency histogram's cumulative count at bound `le` (labels as the text has them)."""
    return sum(
        v
        for (name, labels), v in samples.items()
        if name == "sluice_delivery_latency_seconds_bucket"
        and dict(labels).get("tier") == tier
        and float(dict(labels)["le"]) == le
    )


@pytest.mark.parametrize("stack_services", [("ingest", "expander", "scheduler")])
async def test_scheduler_gauges_match_its_own_view(stack: Stack) -> None:
    # No deliverer: the mail stays queued; the test takes a lease itself.
    await send(stack, "bulk", "bob@mail.test", "carol@other.test")
    await send(stack, "bulk", "dave@mail.test")
    async with grpc.aio.insecure_channel(stack.cfg.scheduler.listen) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)

        async def backlog() -> scheduler_pb2.ListSitesResponse | None:
            sites = await stub.ListSites(scheduler_pb2.ListSitesRequest())
            total = sum(b.messages for s in sites.sites for b in s.backlog)
            return sites if total == 3 else None

        sites = await wait_for(backlog, what="3 queued messages in the scheduler's view")
        granted = await stub.AcquireLeases(
            scheduler_pb2.AcquireLeasesRequest(deliverer_id="probe", max_leases=4)
        )
    assert granted.leases, "the scheduler granted a lease for the queued mail"
    samples = scrape()
    # Backlog per tier and site, as ListSites reports it (both domains share one MX: one site).
    want = {
        (s.site_id, "bulk"): sum(b.messages for b in s.backlog) for s in sites.sites if s.backlog
    }
    got = {
        (dict(labels)["site"], dict(labels)["tier"]): v
        for (name, labels), v in samples.items()
        if name == "sluice_backlog"
    }
    assert got == want == {("mx.mail.test", "bulk"): 3}
    for lease in granted.leases:
        assert value(samples, "sluice_site_leases", site=lease.site_id) == 1
        assert value(samples, "sluice_site_connections", site=lease.site_id) == (
            lease.max_connections
        )
