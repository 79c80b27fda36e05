"""A deliverer working alone has room, by default, for a dedicated queue's site beside every
hash-bucket lane: within a tier the scheduler offers lanes before sites, and with 16 lease
slots a lone deliverer took the 16 lanes and nothing else, so a long tail's busiest domains
(a third of its mail) waited for the lanes to drain (bench.shaping: their consumers appeared
12-24 s into a 25 s run). A real Scheduler on a real nats-server and a real DNS server."""

from __future__ import annotations

from scheduler.service import Scheduler
from scheduler.shaping import load_rules
from sluice import config as config_mod
from sluice import names
from sluice.config import Config
from sluice.devdns import DnsServer
from sluice.nats_layout import connect, ensure_layout
from sluice.natsserver import NatsServer
from sluice.resolver import Resolver
from sluice.v1 import messages_pb2
from tests.conftest import one_site


async def test_a_lone_deliverer_gets_a_busy_site_beside_every_lane(
    nats_server: NatsServer, dns_server: DnsServer
) -> None:
    one_site(dns_server, ["big.test"], "mx.big.test")
    cfg = config_mod.replace(
        Config(),
        nats={"url": nats_server.url},
        scheduler={"lease_ttl": "30s"},
        dns={"nameservers": ["127.0.0.1"], "port": dns_server.port},
    )
    nc = await connect(cfg, "test")
    try:
        js = nc.jetstream()
        await ensure_layout(js, cfg)
        bulk = messages_pb2.TIER_BULK
        lanes = [f"b{i:02d}" for i in range(cfg.expander.buckets)]
        for lane in lanes:
            await js.publish(names.mail_subject(bulk, lane, "tail_test", "acme"), b"pointer")
        await js.publish(
            names.mail_subject(bulk, names.DEDICATED_LANE, "big_test", "acme"), b"pointer"
        )
        scheduler = Scheduler(cfg, js, load_rules(), Resolver(cfg.dns))
        await scheduler.start()
        site = await scheduler.site_of("big.test")  # (as the backlog loop would look it up)

        granted = await scheduler.acquire("d1", cfg.deliverer.max_leases)
        assert sorted(ls.lane for ls in granted if ls.lane) == lanes
        assert site in {ls.site_id for ls in granted if not ls.lane}, "the busy site waits"
    finally:
        await nc.close()
