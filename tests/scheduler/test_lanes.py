"""Bounded consumers: one busy domain gets dedicated queues, a long tail of domains shares
hash-bucket queues, site limits hold for both, and idle consumers are deleted."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from sluice import names
from sluice.devdns import DnsServer
from sluice.nats_layout import connect
from tests.api import blast
from tests.conftest import Stack, one_site, wait_for

TAIL = [f"d{i}.tail.test" for i in range(400)]


@pytest.fixture
def stack_overrides(tmp_path: Path) -> dict[str, dict[str, Any]]:
    shaping = tmp_path / "shaping.toml"
    shaping.write_text('[provider.tail]\nmatch = ["mx.tail.test"]\nmax_connections = 3\n')
    return {
        "scheduler": {"shaping": str(shaping), "lease_ttl": "3s", "consumer_idle": "1s"},
        "deliverer": {"renew_interval": "200ms", "fetch_batch": 16},
        "expander": {"buckets": 4, "dedicated_threshold": 100},
    }


@pytest.fixture
def stack_services() -> tuple[str, ...]:
    return ("ingest", "expander", "scheduler", "deliverer", "deliverer", "webhooks")


@pytest.fixture(autouse=True)
def _mx_records(dns_server: DnsServer) -> None:
    # Every domain, the busy one included, is on one site: mx.tail.test, 3 connections.
    one_site(dns_server, [*TAIL, "big.tail.test"], "mx.tail.test")


async def mail_consumers(stack: Stack) -> list[str]:
    nc = await connect(stack.cfg, "test-consumers")
    try:
        infos = await nc.jetstream().consumers_info(names.MAIL_STREAM)
    finally:
        await nc.close()
    return [i.name for i in infos if i.name.startswith("mail_")]


async def test_a_long_tail_shares_bucket_queues_within_site_limits(
    stack: Stack, dns_server: DnsServer
) -> None:
    stack.smtp.data_delay["big.tail.test"] = 0.002
    # 400 domains with 1-3 recipients each, and 300 recipients at one busy domain.
    emails = [f"u{j}@{d}" for i, d in enumerate(TAIL) for j in range(1 + i % 3)]
    emails += [f"big{j}@big.tail.test" for j in range(300)]
    await blast(stack, emails)
    seen: set[str] = set()

    async def all_arrived() -> bool:
        seen.update(await mail_consumers(stack))
        return len(stack.smtp.received) >= len(emails)

    await wait_for(all_arrived, 120, f"{len(emails)} messages")
    counts = Counter(r.rcpt_tos[0] for r in stack.smtp.received)
    assert set(counts) == set(emails)
    assert max(counts.values()) == 1, "a message arrived twice"
    # One site: the busy domain's own lease and the buckets' domain leases share its budget.
    assert stack.smtp.max_active <= 3, stack.smtp.max_active
    # Its domains share connections: the long tail did not cost a connection per domain.
    assert len(stack.smtp.connected_at) < len(TAIL) // 2, len(stack.smtp.connected_at)
    # Each tail domain's MX was looked up once, by the scheduler: the deliverers took the
    # answer that came with their leases.
    mx_queries = Counter(name for name, rdtype in dns_server.queries if rdtype == "MX")
    assert {mx_queries[d] for d in TAIL} == {1}, Counter(mx_queries[d] for d in TAIL)
    # 401 domains, but consumers only for the busy domain and the 4 buckets (one tenant,
    # one tier).
    assert seen, "no consumer was ever seen"
    assert len(seen) <= 5, sorted(seen)
    assert any("_d_" in c for c in seen), f"the busy domain had no dedicated queue: {seen}"
    assert sum("_b0" in c for c in seen) >= 2, f"bucket queues not used: {seen}"
    # Drained consumers are deleted once idle.
    await wait_for(lambda: _none(stack), 30, "idle consumers deleted")


async def _none(stack: Stack) -> bool:
    return not await mail_consumers(stack)
