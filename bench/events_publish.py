"""Events published as JetStream atomic batches against plain pipelined publishes (what
BatchPublisher does): nats-server's CPU and the client's per event, side by side in one run.

    .venv/bin/python -m bench.events_publish [--batch 100] [--batches 200] [--rounds 3]

nats-server stages each atomic batch in a file store of its own; this shows what that costs
it per event at a given batch size (sluice/outcomes.py says why events are not atomic).
"""

from __future__ import annotations

import argparse
import asyncio
import time

import nats
from nats.js import api

from bench.common import machine, process_cpu_seconds, start_nats
from sluice.atomic import MAX_BATCH, publish_atomic
from sluice.outcomes import BatchPublisher


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not 1 <= args.batch <= MAX_BATCH:
        raise SystemExit(f"--batch: 1..{MAX_BATCH}")
    srv, store_dir = start_nats()
    assert srv.proc is not None
    nc = await nats.connect(srv.url)
    try:
        js = nc.jetstream()
        await js.add_stream(
            api.StreamConfig(name="EV", subjects=["ev.>"], allow_atomic=True, duplicate_window=120)
        )
        plain = BatchPublisher(nc, "EV", max_batch=args.batch)
        n = args.batch * args.batches
        print(machine())
        for rnd in range(args.rounds):
            for how in ("atomic", "plain"):
                msgs = [
                    [
                        (f"ev.{how}", b"x" * 300, {"Nats-Msg-Id": f"{rnd}-{how}-{b}-{i}"})
                        for i in range(args.batch)
                    ]
                    for b in range(args.batches)
                ]
                server0, client0 = process_cpu_seconds(srv.proc.pid), time.process_time()
                wall0 = time.monotonic()
                for batch in msgs:
                    if how == "atomic":
                        await publish_atomic(nc, batch)
                    else:
                        await plain.publish_many(batch)
                server = (process_cpu_seconds(srv.proc.pid) - server0) / n * 1e6
                client = (time.process_time() - client0) / n * 1e6
                print(
                    f"round {rnd + 1} {how:6}: nats-server {server:5.1f} µs/event, client "
                    f"{client:5.1f} µs/event, {time.monotonic() - wall0:.2f} s for {n} events "
                    f"in batches of {args.batch}"
                )
    finally:
        await nc.close()
        srv.stop()
        store_dir.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
