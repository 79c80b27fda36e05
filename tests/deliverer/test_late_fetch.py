"""Pointers that reach a pull subscription after its fetch timed out wait in nats-py for the
next fetch; a deliverer that stops fetching from the queue takes them out and hands them
back at once (sluice.pull.late_messages), instead of leaving them un-acked for a whole
ack_wait. (A real nats-server.)"""

from __future__ import annotations

import asyncio

import nats
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import api

from sluice.natsserver import NatsServer
from sluice.pull import late_messages


async def test_messages_of_a_timed_out_fetch_are_handed_back(nats_server: NatsServer) -> None:
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
        # Fetch with a deadline shorter than the server's answer: the answer comes after
        # the fetch has given up (bounded tries; a fetch that was quick enough gives its
        # messages back and the next try starts over).
        for _ in range(50):
            try:
                for msg in await sub.fetch(5, timeout=0.001):
                    await msg.nak()
            except (TimeoutError, NatsTimeoutError):
                pass
            await asyncio.sleep(0.2)
            if sub.pending_msgs:
                break
        late = late_messages(sub)
        assert late, "no fetch answer came late in 50 tries"
        assert {m.data for m in late} <= sent
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
            if got >= {m.data for m in late}:
                break
        assert got >= {m.data for m in late}
    finally:
        await nc.close()
