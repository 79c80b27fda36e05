"""Pointers that reach a pull subscription after its fetch gave up wait in the
subscription's queue; a deliverer that stops fetching takes them out and hands them back at
once (sluice.pull.late_messages), instead of leaving them un-acked for a whole ack_wait.
(A real nats-server.)"""

from __future__ import annotations

import asyncio

import nats
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import api

from sluice.natsserver import NatsServer
from sluice.pull import late_messages


async def test_messages_of_a_fetch_that_gave_up_are_handed_back(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="LATE", subjects=["late.>"])
        await js.add_consumer(
            "LATE", api.ConsumerConfig(durable_name="q", ack_wait=60, filter_subject="late.>")
        )
        sent = {f"m{i}".encode() for i in range(5)}
        for data in sent:
            await js.publish("late.x", data)
        sub = await js.pull_subscribe_bind("q", "LATE")
        # The answer to a pull request nobody waits for any more (a fetch that timed out
        # before the server answered; sent by hand, so that the answer is late every time
        # rather than when the machine happens to be slow): five messages and the "no
        # messages" status wait in the subscription.
        await nc.publish(sub._nms, b'{"batch": 5, "no_wait": true}', sub._deliver)
        for _ in range(100):
            if sub.pending_msgs >= 6:
                break
            await asyncio.sleep(0.02)
        late = late_messages(sub)
        assert {m.data for m in late} == sent
        assert sub.pending_msgs == 0
        for msg in late:
            await msg.nak()
        # Handed back: another subscription gets them now, not after the 60 s ack_wait.
        other = await js.pull_subscribe_bind("q", "LATE")
        got: set[bytes] = set()
        for _ in range(10):
            try:
                got |= {m.data for m in await other.fetch(5, timeout=1.0)}
            except (TimeoutError, NatsTimeoutError):
                pass
            if got >= sent:
                break
        assert got == sent
    finally:
        await nc.close()
