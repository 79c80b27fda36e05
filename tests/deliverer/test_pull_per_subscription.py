"""Two leases of one process on one site (the scheduler grants a lease at most half of a
site, so one deliverer working a big site holds two) share its queue's subscription: their
fetches take turns. A fetch takes whatever waits in the subscription, another fetch's
messages too, and the fetch robbed came back empty: its connection loop ended as if the
queue were drained, and a 10-domain blast's biggest site ran on 4 connections of 5 for its
last 15 s (bench.shaping). NATS is real; the fetch is wrapped to see when each runs."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any, cast

import pytest
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api

import deliverer.worker as worker_mod
from deliverer.schedclient import SchedulerClient
from deliverer.worker import Deliverer, LeaseWork
from sluice import names
from sluice.nats_layout import connect, ensure_layout
from sluice.natsserver import NatsServer
from sluice.outcomes import BatchPublisher
from sluice.pull import fetch
from sluice.resolver import Resolver
from sluice.store import open_store
from sluice.v1 import messages_pb2, scheduler_pb2
from tests.conftest import make_config

MESSAGES = 600


async def test_two_leases_on_one_queue_fetch_in_turn(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_config(nats_server.url, 53, 25)
    nc = await connect(cfg, "test")
    try:
        js = nc.jetstream()
        await ensure_layout(js, cfg)
        tier, key, tenant = messages_pb2.TIER_BULK, "big_test", "t1"
        consumer = names.mail_consumer(tier, names.DEDICATED_LANE, key, tenant)
        await js.add_consumer(
            names.MAIL_STREAM,
            js_api.ConsumerConfig(
                durable_name=consumer,
                filter_subject=names.mail_filter(tier, names.DEDICATED_LANE, key, tenant),
                ack_policy=js_api.AckPolicy.EXPLICIT,
            ),
        )
        subject = names.mail_subject(tier, names.DEDICATED_LANE, key, tenant)
        for i in range(MESSAGES):
            await js.publish(subject, str(i).encode())

        running: Counter[int] = Counter()
        most: Counter[int] = Counter()

        async def watched(sub: JetStreamContext.PullSubscription, batch: int, wait: float) -> Any:
            running[id(sub)] += 1
            most[id(sub)] = max(most[id(sub)], running[id(sub)])
            try:
                await asyncio.sleep(0.01)  # (the other lease's loop gets its turn here)
                return await fetch(sub, batch, wait)
            finally:
                running[id(sub)] -= 1

        monkeypatch.setattr(worker_mod, "fetch", watched)
        deliverer = Deliverer(
            cfg,
            js,
            open_store(cfg.store, js),
            Resolver(cfg.dns),
            cast(SchedulerClient, object()),
            BatchPublisher(nc, names.EVENTS_STREAM),
        )
        queue = scheduler_pb2.LeaseQueue(
            tier=tier, key=key, lane=names.DEDICATED_LANE, tenant_id=tenant, consumer=consumer
        )
        leases = [
            LeaseWork(scheduler_pb2.Lease(lease_id=f"l{i}", site_id="mx.big.test", queues=[queue]))
            for i in range(2)
        ]
        taken: list[bytes] = []
        robbed = 0  # fetches that came back empty while mail was still there

        async def loop(work: LeaseWork) -> None:
            nonlocal robbed
            while len(taken) < MESSAGES:
                async with work.fetching:
                    msgs: list[Msg] = await deliverer._next_batch(work)
                if not msgs and len(taken) < MESSAGES:
                    robbed += 1
                for msg in msgs:
                    taken.append(msg.data)
                    await msg.ack()

        await asyncio.wait_for(asyncio.gather(*(loop(w) for w in leases for _ in range(3))), 60)
        assert sorted(taken, key=int) == [str(i).encode() for i in range(MESSAGES)]
        assert list(most.values()) == [1]  # one subscription, one fetch at a time
        assert robbed == 0
    finally:
        await nc.close()
