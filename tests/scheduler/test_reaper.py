"""MaxDeliver exhaustion decided by the server: the advisory is captured durably and the
reaper turns the message into a dead letter; a sweep catches what an advisory missed."""

from __future__ import annotations

import asyncio

from scheduler.backlog import Consumers, Queue
from scheduler.reaper import Reaper
from sluice import config as config_mod
from sluice import names
from sluice.nats_layout import connect, ensure_layout
from sluice.natsserver import NatsServer
from sluice.tenants import now_ts
from sluice.v1 import messages_pb2
from tests.conftest import wait_for


async def _exhaust(nats_server: NatsServer) -> tuple[object, object]:
    """A pointer whose every delivery is dropped (as if each deliverer crashed)."""
    cfg = config_mod.replace(
        config_mod.Config(),
        nats={"url": nats_server.url},
        deliverer={"ack_wait": "500ms"},
        retry={"max_deliver": 2},
    )
    nc = await connect(cfg, "test")
    js = nc.jetstream()
    await ensure_layout(js, cfg)
    pointer = messages_pb2.DeliveryPointer(
        delivery_id="job_a-0",
        job_id="job_a",
        tenant_id="acme",
        recipient="bob@mail.test",
        domain="mail.test",
        tier=messages_pb2.TIER_BULK,
        accepted_at=now_ts(),
    )
    queue = Queue(messages_pb2.TIER_BULK, "d", "mail_test", "acme")
    await js.publish(
        names.mail_subject(pointer.tier, queue.lane, queue.key, queue.tenant),
        pointer.SerializeToString(),
    )
    consumer = await Consumers(js, cfg).ensure(queue)
    sub = await js.pull_subscribe_bind(consumer, names.MAIL_STREAM)
    for _ in range(2):
        (msg,) = await sub.fetch(1, timeout=5)  # delivered, never acknowledged
        assert msg.metadata.num_delivered in (1, 2)
        await asyncio.sleep(0.8)
    # The server notices MaxDeliver when it would deliver again: a deliverer's next pull.
    try:
        await sub.fetch(1, timeout=1)
        raise AssertionError("delivered beyond MaxDeliver")
    except TimeoutError:
        pass
    return nc, js


async def _dead_letter(js: object) -> messages_pb2.DeadLetter | None:
    try:
        raw = await js.get_last_msg(names.DLQ_STREAM, names.dlq_subject("acme", "job_a-0"))  # type: ignore[attr-defined]
    except Exception:
        return None
    return messages_pb2.DeadLetter.FromString(raw.data)


async def test_max_deliveries_advisory_becomes_a_dead_letter(nats_server: NatsServer) -> None:
    nc, js = await _exhaust(nats_server)
    stop = asyncio.Event()
    reaper = asyncio.create_task(Reaper(js).run(stop, 3600))  # type: ignore[arg-type]
    try:
        dead = await wait_for(lambda: _dead_letter(js), 30, "the reaper's dead letter")
        assert dead.reason == messages_pb2.DEAD_LETTER_REASON_MAX_DELIVERIES
        assert dead.pointer.recipient == "bob@mail.test"
        info = await js.stream_info(names.MAIL_STREAM)  # type: ignore[attr-defined]
        assert info.state.messages == 0
        failed = await js.get_last_msg(  # type: ignore[attr-defined]
            names.EVENTS_STREAM, "sluice.events.acme.failed.job_a.0"
        )
        assert messages_pb2.Event.FromString(failed.data).bounce_category == "max_deliveries"
    finally:
        stop.set()
        await reaper
        await nc.close()  # type: ignore[attr-defined]


async def test_sweep_catches_a_missed_advisory(nats_server: NatsServer) -> None:
    nc, js = await _exhaust(nats_server)
    await asyncio.sleep(1.0)
    await js.purge_stream(names.ADVISORIES_STREAM)  # type: ignore[attr-defined]  # lost
    assert await Reaper(js).sweep() == 1  # type: ignore[arg-type]
    dead = await _dead_letter(js)
    assert dead is not None and dead.reason == messages_pb2.DEAD_LETTER_REASON_MAX_DELIVERIES
    assert await Reaper(js).sweep() == 0  # type: ignore[arg-type]
    await nc.close()  # type: ignore[attr-defined]
