"""The batch form of a bucket lane's site leases: AcquireLeases with `domains` grants one
lease per distinct site, naming the requested domains of that site, and none for a site at
its limit; `connections` asks for more than one (at most half the site). (A real Scheduler
on a real nats-server, sites from a real DNS server.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

from sluice.devdns import DnsServer
from sluice.natsserver import NatsServer
from tests.conftest import running_scheduler, scheduler_config


async def test_one_lease_per_site_for_a_batch_of_domains(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    dns = DnsServer(
        {
            "a.test": [("MX", "10 mx.shared.test.")],
            "b.test": [("MX", "10 mx.shared.test.")],
            "c.test": [("MX", "10 mx.c.test.")],
            "full.test": [("MX", "10 mx.full.test.")],
        }
    )
    port = await dns.start()
    shaping = tmp_path / "shaping.toml"
    shaping.write_text(
        '[default]\nmax_connections = 2\n\n[domain."full.test"]\nmax_connections = 1\n'
    )
    try:
        async with running_scheduler(
            scheduler_config(nats_server, port), shaping=shaping
        ) as scheduler:
            # full.test's one connection is taken already.
            (full,) = (await scheduler.acquire_domains("d2", ["full.test"])).leases

            resp = await scheduler.acquire_domains(
                "d1", ["a.test", "c.test", "b.test", "full.test", "a.test"]
            )
            leases = resp.leases
            assert dict(resp.domain_sites) == {
                "a.test": "mx.shared.test",
                "b.test": "mx.shared.test",
                "c.test": "mx.c.test",
                "full.test": "mx.full.test",
            }, "every domain's site, leased or not"
            # ... and every domain's MX hosts, as the scheduler resolved them.
            assert {d: [h.host for h in mx.hosts] for d, mx in resp.domain_mx.items()} == {
                "a.test": ["mx.shared.test"],
                "b.test": ["mx.shared.test"],
                "c.test": ["mx.c.test"],
                "full.test": ["mx.full.test"],
            }
            assert all(0 < mx.ttl_seconds <= 60 for mx in resp.domain_mx.values())
            by_site = {ls.site_id: sorted(ls.domains) for ls in leases}
            assert by_site == {"mx.shared.test": ["a.test", "b.test"], "mx.c.test": ["c.test"]}
            assert all(ls.max_connections == 1 for ls in leases)
            assert scheduler.leases.in_use("mx.shared.test") == 1

            # Released in one call, the connections are free again.
            scheduler.release("d1", [ls.lease_id for ls in leases])
            assert scheduler.leases.in_use("mx.shared.test") == 0
            assert scheduler.leases.in_use("mx.c.test") == 0

            # Asked to wait, the call for a full site is granted when its connection is released.
            waiting = asyncio.ensure_future(scheduler.acquire_domains("d1", ["full.test"], 10.0))
            await asyncio.sleep(0.3)
            assert not waiting.done(), "the site is full: the call waits"
            scheduler.release("d2", [full.lease_id])
            (granted,) = (await asyncio.wait_for(waiting, 10)).leases
            assert granted.site_id == "mx.full.test" and granted.max_connections == 1
            # Nothing released within the wait: an empty answer, and still one connection.
            assert not (await scheduler.acquire_domains("d3", ["full.test"], 0.3)).leases
            assert scheduler.leases.in_use("mx.full.test") == 1
    finally:
        dns.close()


async def test_connections_asked_for_and_no_more_while_another_waits(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    dns = DnsServer(
        {
            "big.test": [
                ("MX", "10 mx1.big.test."),
                ("MX", "10 mx2.big.test."),
                ("MX", "20 backup.big.test."),
            ],
            "mx1.big.test": [("A", "127.0.0.11")],
            "mx2.big.test": [("A", "127.0.0.12"), ("AAAA", "::1")],
            "backup.big.test": [("A", "127.0.0.13")],
        }
    )
    port = await dns.start()
    shaping = tmp_path / "shaping.toml"
    shaping.write_text("[default]\nmax_connections = 6\n")
    try:
        async with running_scheduler(
            scheduler_config(nats_server, port), shaping=shaping
        ) as scheduler:
            # Four asked for: at most half the site's six.
            resp = await scheduler.acquire_domains("d1", ["big.test"], connections=4)
            (first,) = resp.leases
            assert first.max_connections == 3
            # ... with the domain's MX hosts, by preference.
            assert [h.host for h in resp.domain_mx["big.test"].hosts] == [
                "mx1.big.test",
                "mx2.big.test",
                "backup.big.test",
            ]
            # A second holder takes the other three; the site is full.
            (second,) = (await scheduler.acquire_domains("d2", ["big.test"], connections=4)).leases
            assert second.max_connections == 3
            # d3 finds the site full; when d2 gives its three back, d1, which holds some of
            # the site, gets no more of it for a second: d3 is about to ask again ...
            assert not (await scheduler.acquire_domains("d3", ["big.test"])).leases
            scheduler.release("d2", [second.lease_id])
            assert not (await scheduler.acquire_domains("d1", ["big.test"], connections=4)).leases
            (granted,) = (await scheduler.acquire_domains("d3", ["big.test"])).leases
            assert granted.max_connections == 1, "one connection asked for"
            # ... and after that second, it does.
            await asyncio.sleep(1.1)
            (extra,) = (await scheduler.acquire_domains("d1", ["big.test"], connections=4)).leases
            assert extra.max_connections == 2
            assert scheduler.leases.in_use("backup.big.test,mx1.big.test,mx2.big.test") == 6
    finally:
        dns.close()
