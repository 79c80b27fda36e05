"""The backlog as the scheduler reads it from the MAIL stream (a real nats-server): messages
per queue (a dedicated lane's domain, or a whole hash bucket, per tier and tenant), per
(tier, domain key), and the domain keys with mail in buckets."""

from __future__ import annotations

from scheduler.backlog import Queue, read_backlog
from sluice import config as config_mod
from sluice import names
from sluice.config import Config
from sluice.nats_layout import connect, ensure_layout
from sluice.natsserver import NatsServer
from sluice.v1 import messages_pb2

BULK = messages_pb2.TIER_BULK
CRITICAL = messages_pb2.TIER_CRITICAL


async def test_backlog_per_queue_domain_and_bucket(nats_server: NatsServer) -> None:
    cfg = config_mod.replace(Config(), nats={"url": nats_server.url})
    nc = await connect(cfg, "test")
    try:
        js = nc.jetstream()
        await ensure_layout(js, cfg)
        sends = [
            (BULK, "d", "big_test", "acme", 3),
            (CRITICAL, "d", "big_test", "acme", 1),
            (BULK, "b01", "a_test", "acme", 2),
            (BULK, "b01", "b_test", "acme", 1),
            (BULK, "b01", "a_test", "other", 4),
            (BULK, "b02", "c_test", "acme", 1),
        ]
        for tier, lane, key, tenant, n in sends:
            for _ in range(n):
                await js.publish(names.mail_subject(tier, lane, key, tenant), b"x")
        backlog = await read_backlog(js)
        assert backlog.queues == {
            Queue(BULK, "d", "big_test", "acme"): 3,
            Queue(CRITICAL, "d", "big_test", "acme"): 1,
            Queue(BULK, "b01", "", "acme"): 3,
            Queue(BULK, "b01", "", "other"): 4,
            Queue(BULK, "b02", "", "acme"): 1,
        }
        assert dict(backlog.domains) == {
            (BULK, "big_test"): 3,
            (CRITICAL, "big_test"): 1,
            (BULK, "a_test"): 6,
            (BULK, "b_test"): 1,
            (BULK, "c_test"): 1,
        }
        assert backlog.bucketed == {"a_test", "b_test", "c_test"}
        # A second read gives equal queues (made once, reused).
        again = await read_backlog(js)
        assert again.queues == backlog.queues
        assert all(a is b for a, b in zip(again.queues, backlog.queues, strict=True))
    finally:
        await nc.close()
