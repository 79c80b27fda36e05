"""The batch form of a bucket lane's domain leases: AcquireLeases with `domains` grants one
one-connection lease per distinct site, naming the requested domains of that site, and none
for a site at its limit. (A real Scheduler on a real nats-server, sites from a real DNS
server.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

from scheduler.service import Scheduler
from scheduler.shaping import load_rules
from sluice import config as config_mod
from sluice.config import Config
from sluice.devdns import DnsServer
from sluice.nats_layout import connect, ensure_layout
from sluice.natsserver import NatsServer
from sluice.resolver import Resolver


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
    cfg = config_mod.replace(
        Config(),
        nats={"url": nats_server.url},
        dns={"nameservers": ["127.0.0.1"], "port": port},
        scheduler={"shaping": str(shaping)},
    )
    nc = await connect(cfg, "test")
    try:
        js = nc.jetstream()
        await ensure_layout(js, cfg)
        scheduler = Scheduler(cfg, js, load_rules(shaping), Resolver(cfg.dns))
        await scheduler.start()
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
        await nc.close()
        dns.close()
