"""Outcome reports (Scheduler.report): counted outcomes (Outcome.count, sent by current
deliverers) and one Outcome per attempt (count 0, sent by older ones) weigh the same in the
adaptive limits. (A real nats-server keeps the adapted limits.)"""

from __future__ import annotations

from sluice.natsserver import NatsServer
from sluice.v1 import messages_pb2, scheduler_pb2
from tests.conftest import running_scheduler, scheduler_config

DELIVERED = scheduler_pb2.OUTCOME_KIND_DELIVERED
THROTTLED = scheduler_pb2.OUTCOME_KIND_THROTTLED


async def test_counted_and_single_outcomes_count_alike(nats_server: NatsServer) -> None:
    cfg = scheduler_config(
        nats_server,
        scheduler={"recover_after": 10, "recover_step": 0.25, "throttle_cooldown": "0s"},
    )
    async with running_scheduler(cfg, start=False) as scheduler:
        site = "mx.slow.test"
        throttle = scheduler_pb2.Outcome(
            site_id=site,
            domain="slow.test",
            kind=THROTTLED,
            reply=messages_pb2.SmtpReply(code=421, enhanced_code="4.7.0", text="rate limited"),
        )
        await scheduler.report([throttle])
        assert scheduler.adaptive.states[site].factor == 0.5
        # Nine successes as one count and one as a single outcome make the ten that recover.
        await scheduler.report([scheduler_pb2.Outcome(site_id=site, kind=DELIVERED, count=9)])
        assert scheduler.adaptive.states[site].factor == 0.5
        assert scheduler.adaptive.states[site].successes == 9
        await scheduler.report([scheduler_pb2.Outcome(site_id=site, kind=DELIVERED)])
        assert scheduler.adaptive.states[site].factor == 0.75
        assert scheduler.outcomes[(site, DELIVERED)] == 10
        assert scheduler.outcomes[(site, THROTTLED)] == 1
