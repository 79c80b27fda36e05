"""Hash-bucket mail for a site that another connection loop of the deliverer serves is queued
for that loop (it goes through the connection open or awaited there); when that loop finds
no connection in time, the queued mail goes back to JetStream and comes again later. Nothing
is lost or sent twice, and the site's limit holds. (Real NATS, DNS, SMTP, scheduler and
deliverer; the site's one connection is first held by another lease holder.)"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest

from deliverer.schedclient import SchedulerClient
from sluice.devdns import DnsServer
from sluice.v1 import scheduler_pb2
from tests.api import blast
from tests.conftest import Stack, one_site, wait_for
from tests.sluice.test_metrics import scrape, value

DOMAINS = [f"t{i}.busy.test" for i in range(30)]
WAITS = "sluice_deliverer_site_waits_total"


@pytest.fixture
def stack_overrides(tmp_path: Path) -> dict[str, dict[str, Any]]:
    shaping = tmp_path / "shaping.toml"
    shaping.write_text('[provider.busy]\nmatch = ["mx.busy.test"]\nmax_connections = 1\n')
    return {
        "scheduler": {"shaping": str(shaping), "lease_ttl": "4s", "bucket_connections": 4},
        # A loop waits at most half a second for the site before its mail goes back.
        "deliverer": {"renew_interval": "300ms", "fetch_batch": 4, "site_wait": "500ms"},
        "expander": {"buckets": 4, "dedicated_threshold": 1000},
    }


@pytest.fixture(autouse=True)
def _mx_records(dns_server: DnsServer) -> None:
    one_site(dns_server, DOMAINS, "mx.busy.test")


async def test_mail_for_a_served_site_is_queued_and_handed_back_when_it_stays_full(
    stack: Stack,
) -> None:
    stack.smtp.data_delay.update({d: 0.02 for d in DOMAINS})
    before = scrape()
    held: list[scheduler_pb2.Lease] = []
    async with SchedulerClient(stack.cfg.deliverer.scheduler) as client:
        # Another holder has the site's only connection for the first two seconds.
        async def blocker() -> bool:
            try:
                resp = await client.AcquireLeases(
                    scheduler_pb2.AcquireLeasesRequest(deliverer_id="blocker", domain=DOMAINS[0]),
                    timeout=5,
                )
            except grpc.aio.AioRpcError:  # (the scheduler is still starting)
                return False
            held.extend(resp.leases)
            return bool(resp.leases)

        await wait_for(blocker, 20, "the blocker's lease")
        emails = [f"u{j}@{d}" for d in DOMAINS for j in range(4)]
        await blast(stack, emails)
        await asyncio.sleep(2.0)
        assert not stack.smtp.received, "the site's one connection was taken"
        await client.ReleaseLeases(
            scheduler_pb2.ReleaseLeasesRequest(
                deliverer_id="blocker",
                lease_ids=[ls.lease_id for ls in held],
            )
        )
        await wait_for(lambda: len(stack.smtp.received) >= len(emails), 120, "every message")
    await asyncio.sleep(0.5)  # anything that would come twice
    counts = Counter(r.rcpt_tos[0] for r in stack.smtp.received)
    assert set(counts) == set(emails), "mail was lost"
    assert max(counts.values()) == 1, "a message arrived twice"
    assert stack.smtp.max_active <= 1, stack.smtp.max_active
    after = scrape()
    queued = value(after, WAITS, how="queued") - value(before, WAITS, how="queued")
    handed_back = value(after, WAITS, how="handed_back") - value(before, WAITS, how="handed_back")
    # While one loop waited for (then held) the site, the others queued their mail for it...
    assert queued > 0, (queued, handed_back)
    # ... and while the site stayed full past the wait, mail went back and came again.
    assert handed_back > 0, (queued, handed_back)


async def test_critical_bucket_mail_passes_a_full_site_queue_of_bulk(stack: Stack) -> None:
    """More bulk for the site than its queue in the deliverer holds (the lane waits for room):
    critical mail queued for the site goes out first, before a quarter of the bulk."""
    stack.smtp.data_delay.update({d: 0.01 for d in DOMAINS})
    await blast(stack, [f"bulk{j}@{d}" for j in range(20) for d in DOMAINS])  # 600
    await wait_for(lambda: len(stack.smtp.received) >= 10, 30, "bulk under way")
    await blast(stack, [f"crit{j}@{d}" for j, d in enumerate(DOMAINS[:10])], tier="critical")

    def arrivals() -> list[str]:
        return [r.rcpt_tos[0] for r in stack.smtp.received]

    await wait_for(
        lambda: sum(a.startswith("crit") for a in arrivals()) == 10, 60, "10 critical messages"
    )
    order = arrivals()
    last_critical = max(i for i, a in enumerate(order) if a.startswith("crit"))
    bulk_before = sum(a.startswith("bulk") for a in order[:last_critical])
    # (43-84 here; a queue served in arrival order would let its 256 bulk go first)
    assert bulk_before < 150, f"{bulk_before} of 600 bulk messages went before the last critical"
    await wait_for(lambda: len(stack.smtp.received) >= 610, 120, "every message")
    assert stack.smtp.max_active <= 1, stack.smtp.max_active
