"""nats-server's CPU per pointer by how many distinct subjects the mail queue holds: a
work-queue stream on file storage with 16 wildcard consumers (as the hash-bucket lanes are),
N messages published (plain publishes, no PubAck) evenly over D domain tokens, then fetched
and acked in batches of 64.

    .venv/bin/python -m bench.subjects [--messages 40000] [--rounds 2] [--idle-consumers 0,50,200]

Each round runs 10 domains, 4,289 domains (a 20,000-recipient Zipf blast over 10,000
domains hits that many) and 4,289 domains sharing one subject token per bucket.
"""

from __future__ import annotations

import argparse
import asyncio
import zlib

import nats
from nats.js import api

from bench.common import machine, process_cpu_seconds, start_nats
from sluice.pull import fetch

_BUCKETS = 16


async def _run(domains: int, messages: int, one_token: bool, idle: int = 0) -> float:
    """nats-server's CPU seconds for publishing, fetching and acking `messages`, with `idle`
    more consumers whose filters match none of them (as a dedicated queue's consumer is
    for every other domain's mail)."""
    srv, store = start_nats()
    assert srv.proc is not None
    try:
        nc = await nats.connect(srv.url)
        js = nc.jetstream()
        await js.add_stream(
            name="M",
            subjects=["m.>"],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
        )

        async def consumer(name: str, filter_subject: str) -> None:
            await js.add_consumer(
                "M",
                api.ConsumerConfig(
                    durable_name=name,
                    filter_subject=filter_subject,
                    ack_policy=api.AckPolicy.EXPLICIT,
                ),
            )

        subs = []
        for b in range(_BUCKETS):
            await consumer(f"b{b}", f"m.b{b:02d}.*.t")
            subs.append(await js.pull_subscribe_bind(f"b{b}", "M"))
        for i in range(idle):
            await consumer(f"idle{i}", f"m.d.idle{i}_test.t")
        names = [f"d{i}_zipf_test" for i in range(domains)]
        subjects = [
            f"m.b{zlib.crc32(d.encode()) % _BUCKETS:02d}.{'all' if one_token else d}.t"
            for d in names
        ]
        cpu0 = process_cpu_seconds(srv.proc.pid)
        for i in range(messages):
            await nc.publish(subjects[i % domains], b"x" * 200)
        await nc.flush()
        while (await js.stream_info("M")).state.messages < messages:
            await asyncio.sleep(0.05)

        async def drain(sub: nats.js.JetStreamContext.PullSubscription) -> int:
            n = 0
            while msgs := await fetch(sub, 64, 0.2):
                for msg in msgs:
                    await msg.ack()
                n += len(msgs)
            return n

        done = sum(await asyncio.gather(*(drain(s) for s in subs)))
        assert done == messages, (done, messages)
        # (acks are taken, and acked messages removed, after they are sent: until then)
        while (await js.stream_info("M")).state.messages:
            await asyncio.sleep(0.05)
        cpu = process_cpu_seconds(srv.proc.pid) - cpu0
        await nc.close()
        return cpu
    finally:
        srv.stop()
        store.cleanup()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=40_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--idle-consumers",
        default="",
        help="instead: 10 domains with this many more consumers (comma-separated counts) "
        "that match none of the mail",
    )
    args = ap.parse_args()
    print(machine())
    for rnd in range(args.rounds):
        figures = []
        if args.idle_consumers:
            for idle in (int(n) for n in args.idle_consumers.split(",")):
                cpu = await _run(10, args.messages, False, idle)
                figures.append(f"{_BUCKETS + idle} consumers {cpu / args.messages * 1e6:.1f} µs")
        else:
            for domains, one_token in ((10, False), (4289, False), (4289, True)):
                cpu = await _run(domains, args.messages, one_token)
                what = f"{domains} domains" + (", one token" if one_token else "")
                figures.append(f"{what} {cpu / args.messages * 1e6:.1f} µs")
        print(f"round {rnd + 1}: nats-server CPU per message: " + "; ".join(figures))


if __name__ == "__main__":
    asyncio.run(main())
