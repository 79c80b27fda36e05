"""sluice.pull.fetch against a real nats-server: what is ready comes at once (a batch at
most), nothing ready waits for the first to come or gives [] at the deadline, messages that
came late for an earlier fetch come first, and a consumer that is gone raises a NATS error
(the deliverer binds again then)."""

from __future__ import annotations

import asyncio
import time

import nats
import pytest
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext, api

from sluice.natsserver import NatsServer
from sluice.pull import delivered_count, fetch


async def _queue(js: JetStreamContext, stream: str) -> JetStreamContext.PullSubscription:
    """A work-queue stream on `<stream>.>` (lower case) with a pull consumer "q", bound."""
    prefix = stream.lower()
    await js.add_stream(name=stream, subjects=[f"{prefix}.>"], retention="workqueue")
    await js.add_consumer(stream, api.ConsumerConfig(durable_name="q", ack_wait=60))
    return await js.pull_subscribe_bind("q", stream)


async def test_fetch_takes_what_is_ready_and_waits_only_when_nothing_is(
    nats_server: NatsServer,
) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        sub = await _queue(js, "P")
        for i in range(7):
            await js.publish("p.x", b"m%d" % i)

        first = await fetch(sub, 5, 5.0)
        assert [m.data for m in first] == [b"m0", b"m1", b"m2", b"m3", b"m4"]
        # Fewer ready than asked for: those two, without waiting out the 5 s.
        started = time.monotonic()
        rest = await fetch(sub, 5, 5.0)
        assert [m.data for m in rest] == [b"m5", b"m6"]
        assert time.monotonic() - started < 4.0
        for m in [*first, *rest]:
            await m.ack()

        # Nothing ready: [] once the wait is over.
        assert await fetch(sub, 5, 0.2) == []
        # Nothing ready, one published meanwhile: it comes as soon as it is stored.
        later = asyncio.get_running_loop().call_later(
            0.3, lambda: asyncio.ensure_future(js.publish("p.x", b"late"))
        )
        got = await fetch(sub, 5, 5.0)
        later.cancel()
        assert [m.data for m in got] == [b"late"]
        await got[0].ack_sync()
        assert sub.pending_msgs == 0
        assert (await js.stream_info("P")).state.messages == 0
    finally:
        await nc.close()


async def test_messages_that_came_after_a_fetch_gave_up_come_with_the_next(
    nats_server: NatsServer,
) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        sub = await _queue(js, "L")
        for i in range(2):
            await js.publish("l.x", b"m%d" % i)
        # The answer to a pull request that nobody waits for any more (a fetch that gave
        # up): two messages and the "no messages" status wait in the subscription.
        await nc.publish(sub._nms, b'{"batch": 5, "no_wait": true}', sub._deliver)
        for _ in range(50):
            if sub.pending_msgs >= 3:
                break
            await asyncio.sleep(0.02)
        assert sub.pending_msgs >= 3
        for i in range(2, 4):
            await js.publish("l.x", b"m%d" % i)
        # They come first, then what is ready; the old status does not end the new fetch.
        got = await fetch(sub, 10, 0.2)
        assert [m.data for m in got] == [b"m0", b"m1", b"m2", b"m3"]
        assert sub.pending_msgs == 0
    finally:
        await nc.close()


async def test_a_consumer_that_is_gone_raises(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        sub = await _queue(js, "G")
        await js.delete_consumer("G", "q")
        with pytest.raises(NatsError):
            await fetch(sub, 5, 0.5)
    finally:
        await nc.close()


async def test_delivered_count_agrees_with_the_metadata_across_redeliveries(
    nats_server: NatsServer,
) -> None:
    """The count read from the ack subject is nats-py's num_delivered, redelivery after
    redelivery; and the two ack subject forms (with and without domain and account hash)."""
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        sub = await _queue(js, "D")
        await js.publish("d.x", b"m")
        for n in (1, 2, 3):
            [msg] = await fetch(sub, 1, 5.0)
            assert delivered_count(msg) == msg.metadata.num_delivered == n
            await msg.nak()
    finally:
        await nc.close()
    v1 = Msg(nc, reply="$JS.ACK.S.C.4.10.9.1700000000000000000.0")
    v2 = Msg(nc, reply="$JS.ACK._.HASH.S.C.5.10.9.1700000000000000000.0.rand")
    assert (delivered_count(v1), delivered_count(v2)) == (4, 5)
    assert (v1.metadata.num_delivered, v2.metadata.num_delivered) == (4, 5)
