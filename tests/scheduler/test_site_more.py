"""A site queue that outgrows its lease asks for more of the site (a lease takes at most half
of a site, so one deliverer reaches the site's limit only by asking again), and never more
than the limit. (Real NATS, DNS, SMTP, scheduler and one deliverer; bucket mail.)"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from sluice.devdns import DnsServer
from tests.api import blast
from tests.conftest import Stack, one_site, wait_for

DOMAINS = [f"t{i}.roomy.test" for i in range(30)]
LIMIT = 4


@pytest.fixture
def stack_overrides(tmp_path: Path) -> dict[str, dict[str, Any]]:
    shaping = tmp_path / "shaping.toml"
    shaping.write_text(f'[provider.roomy]\nmatch = ["mx.roomy.test"]\nmax_connections = {LIMIT}\n')
    return {
        "scheduler": {"shaping": str(shaping)},
        # Every domain below the threshold: all of it is hash-bucket mail, in site queues.
        "expander": {"buckets": 4, "dedicated_threshold": 1000},
    }


@pytest.fixture(autouse=True)
def _mx_records(dns_server: DnsServer) -> None:
    one_site(dns_server, DOMAINS, "mx.roomy.test")


async def test_a_queue_that_outgrows_its_lease_gets_more_of_the_site(stack: Stack) -> None:
    stack.smtp.data_delay.update({d: 0.05 for d in DOMAINS})  # (the queue stays long)
    emails = [f"u{j}@{d}" for d in DOMAINS for j in range(10)]
    await blast(stack, emails)
    await wait_for(lambda: len(stack.smtp.received) >= len(emails), 120, "every message")
    counts = Counter(r.rcpt_tos[0] for r in stack.smtp.received)
    assert set(counts) == set(emails), "mail was lost"
    assert max(counts.values()) == 1, "a message arrived twice"
    # The first lease had half the site (2 connections); only more leases make it 3 or 4.
    assert stack.smtp.max_active > LIMIT // 2, stack.smtp.max_active
    assert stack.smtp.max_active <= LIMIT, stack.smtp.max_active
