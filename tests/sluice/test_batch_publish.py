"""BatchPublisher against a real nats-server: concurrent publishes are stored in batches
(fewer batches than messages) of plain publishes, never JetStream atomic batches; every
caller returns once its message is stored; a message that repeats a Nats-Msg-Id is
deduplicated as usual."""

from __future__ import annotations

import asyncio

from nats.js.errors import APIError, NoStreamResponseError

from sluice import names
from sluice.config import Config, NatsConfig
from sluice.nats_layout import connect, ensure_layout
from sluice.natsserver import NatsServer
from sluice.outcomes import WRONG_LAST_SEQUENCE, BatchPublisher


async def test_concurrent_publishes_go_out_in_batches_and_repeats_are_deduplicated(
    nats_server: NatsServer,
) -> None:
    cfg = Config(nats=NatsConfig(url=nats_server.url))
    nc = await connect(cfg, "test")
    try:
        js = nc.jetstream()
        await ensure_layout(js, cfg)
        pub = BatchPublisher(nc, names.EVENTS_STREAM)
        batches = 0
        real_send = pub._send

        async def counting_send(batch: list[tuple[str, bytes, dict[str, str], object]]) -> None:
            nonlocal batches
            batches += 1
            await real_send(batch)  # type: ignore[arg-type]

        pub._send = counting_send  # type: ignore[method-assign,assignment]

        def msg(i: int) -> tuple[str, bytes, dict[str, str]]:
            return f"sluice.events.acme.delivered.job.{i}", b"e%d" % i, {"Nats-Msg-Id": f"e{i}"}

        await asyncio.gather(*(pub.publish(*msg(i)) for i in range(600)))
        info = await js.stream_info(names.EVENTS_STREAM)
        assert info.state.messages == 600
        assert 1 < batches < 600 / 10, f"{batches} batches for 600 messages"
        stored = await js.get_msg(names.EVENTS_STREAM, 1)
        assert not stored.headers or "Nats-Batch-Id" not in stored.headers, "not atomic"

        # A batch holding a repeat of e5 (and of itself): the new ones are stored once, the
        # repeats deduplicated.
        again = [msg(5), msg(700), msg(701), msg(701)]
        await asyncio.gather(*(pub.publish(*m) for m in again))
        info = await js.stream_info(names.EVENTS_STREAM)
        assert info.state.messages == 602
    finally:
        await nc.close()


async def test_each_caller_learns_its_own_outcome(nats_server: NatsServer) -> None:
    """A batch is published message by message, without waiting for each PubAck in turn;
    each caller still returns only once its message is stored, repeats are deduplicated,
    and a message no stream takes, or one the stream refuses, fails for its caller alone."""
    cfg = Config(nats=NatsConfig(url=nats_server.url))
    nc = await connect(cfg, "test")
    try:
        js = nc.jetstream()
        await ensure_layout(js, cfg)
        pub = BatchPublisher(nc, names.EVENTS_STREAM)

        def msg(i: int) -> tuple[str, bytes, dict[str, str]]:
            return f"sluice.events.acme.delivered.job.{i}", b"e%d" % i, {"Nats-Msg-Id": f"e{i}"}

        for n in (1, 5, 20):
            start = (await js.stream_info(names.EVENTS_STREAM)).state.messages
            await asyncio.gather(*(pub.publish(*msg(start + i)) for i in range(n)))
            assert (await js.stream_info(names.EVENTS_STREAM)).state.messages == start + n
        stored = await js.get_msg(names.EVENTS_STREAM, 1)
        assert not stored.headers or "Nats-Batch-Id" not in stored.headers
        results = await asyncio.gather(
            pub.publish(*msg(3)),  # a repeat
            pub.publish("sluice.nowhere.x", b"x", {}),  # no stream takes it
            pub.publish(*msg(100)),
            # the stream refuses it (its PubAck is an error)
            pub.publish(
                "sluice.events.acme.delivered.job.x", b"x", {"Nats-Expected-Last-Sequence": "9"}
            ),
            return_exceptions=True,
        )
        assert results[0] is None and results[2] is None
        assert isinstance(results[1], NoStreamResponseError), results[1]
        assert isinstance(results[3], APIError) and results[3].err_code == WRONG_LAST_SEQUENCE
        assert (await js.stream_info(names.EVENTS_STREAM)).state.messages == 27
    finally:
        await nc.close()


async def test_a_window_gathers_publishes_that_come_one_by_one(nats_server: NatsServer) -> None:
    """With a window, messages published one after another within it go out as one batch
    (the deliverer's transactions end one by one); without one, each goes on its own."""
    cfg = Config(nats=NatsConfig(url=nats_server.url))
    nc = await connect(cfg, "test")
    try:
        js = nc.jetstream()
        await ensure_layout(js, cfg)

        def msg(i: int) -> tuple[str, bytes, dict[str, str]]:
            return f"sluice.events.acme.delivered.job.{i}", b"e%d" % i, {"Nats-Msg-Id": f"w{i}"}

        sizes: dict[float, list[int]] = {}
        for window, base in ((0.0, 0), (0.5, 100)):
            pub = BatchPublisher(nc, names.EVENTS_STREAM, window=window)
            sizes[window] = []
            real_send = pub._send

            async def counting_send(
                batch: list[tuple[str, bytes, dict[str, str], object]],
                seen: list[int] = sizes[window],
                send: object = real_send,
            ) -> None:
                seen.append(len(batch))
                await send(batch)  # type: ignore[operator]

            pub._send = counting_send  # type: ignore[method-assign,assignment]

            async def one_by_one(pub: BatchPublisher = pub, base: int = base) -> None:
                waits = []
                for i in range(5):  # each a turn of the event loop (and more) after the last
                    waits.append(asyncio.ensure_future(pub.publish(*msg(base + i))))
                    await asyncio.sleep(0.01)
                await asyncio.gather(*waits)

            await one_by_one()
        # (without a window a message waits only for the batch in flight, if any)
        assert sum(sizes[0.0]) == 5 and len(sizes[0.0]) >= 2, sizes
        assert sizes[0.5] == [5]
        assert (await js.stream_info(names.EVENTS_STREAM)).state.messages == 10
    finally:
        await nc.close()
