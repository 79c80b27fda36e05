"""Hash-bucket lanes are shared evenly between deliverers: the first deliverer to ask may take
every lane while it is alone, but once a second one asks, the first's next renewal gives back
the lanes beyond its share and the second gets them. (A real Scheduler on a real nats-server,
with mail pointers stored on eight bucket lanes.)"""

from __future__ import annotations

import time

from scheduler.service import Scheduler
from scheduler.shaping import load_rules
from sluice import config as config_mod
from sluice import names
from sluice.config import Config
from sluice.nats_layout import connect, ensure_layout
from sluice.natsserver import NatsServer
from sluice.resolver import Resolver
from sluice.v1 import messages_pb2


async def test_lanes_are_split_between_deliverers(nats_server: NatsServer) -> None:
    cfg = config_mod.replace(
        Config(), nats={"url": nats_server.url}, scheduler={"lease_ttl": "30s"}
    )
    nc = await connect(cfg, "test")
    try:
        js = nc.jetstream()
        await ensure_layout(js, cfg)
        lanes = [f"b{i:02d}" for i in range(8)]
        for lane in lanes:
            await js.publish(
                names.mail_subject(messages_pb2.TIER_BULK, lane, "mail_test", "acme"), b"pointer"
            )
        scheduler = Scheduler(cfg, js, load_rules(), Resolver(cfg.dns))
        await scheduler.start()

        first = await scheduler.acquire("d1", 16)
        assert sorted(ls.lane for ls in first) == lanes, "alone, d1 takes every lane"
        assert await scheduler.acquire("d2", 16) == [], "nothing is free yet"

        # d1's renewal gives back what is beyond its share of 8 lanes between 2 deliverers.
        renewed = await scheduler.renew("d1", [ls.lease_id for ls in first])
        assert len(renewed.leases) == 4 and len(renewed.lost_lease_ids) == 4
        second = await scheduler.acquire("d2", 16)
        kept = {ls.lane for ls in renewed.leases}
        assert {ls.lane for ls in second} == set(lanes) - kept

        # Balanced now: neither gives anything back, and no lane is held twice.
        again = await scheduler.renew("d1", [ls.lease_id for ls in renewed.leases])
        assert len(again.leases) == 4 and not again.lost_lease_ids
        held = [ls.lane for ls in scheduler.leases.all() if ls.kind == "lane"]
        assert sorted(held) == lanes

        # A deliverer that stopped asking (crashed, or busy at its max_leases) no longer
        # counts: d2's lanes go back once d2's leases are gone, and d1 may take them all,
        # rather than half of them staying unleased for d2.
        for ls in second:
            scheduler.leases.release("d2", ls.lease_id)
        scheduler._seen["d2"] = time.monotonic() - 3600
        await scheduler.renew("d2", [])  # renewing (other leases) is not asking for lanes
        regained = await scheduler.acquire("d1", 16)
        assert sorted(ls.lane for ls in [*again.leases, *regained]) == lanes
    finally:
        await nc.close()
