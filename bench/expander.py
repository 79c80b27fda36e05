"""Expander fan-out rate: one blast of N recipients (default 100,000 over 1,000 domains)
expanded into MAIL by P expander processes; prints pointers/s.

    .venv/bin/python -m bench.expander [--recipients N] [--processes P] [--blasts B]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import orjson

from bench.common import machine, start_nats
from sluice import config as config_mod
from sluice import names
from sluice.config import Config
from sluice.nats_layout import connect, ensure_layout
from sluice.store import open_store
from sluice.tenants import now_ts
from sluice.v1 import messages_pb2


async def enqueue_blast(cfg: Config, n: int, domains: int) -> None:
    nc = await connect(cfg, "bench")
    js = nc.jetstream()
    store = open_store(cfg.store, js)
    job_id = f"job_{time.time_ns() // 1_000_000:012x}{os.urandom(6).hex()}"
    payload = messages_pb2.Payload(subject="Hi {{name}}", text="x" * 2000)
    getattr(payload, "from").email = "news@bench.test"
    rows = [
        {"email": f"u{i}@d{i % domains}.test", "substitutions": {"name": f"U{i}"}} for i in range(n)
    ]
    job = messages_pb2.JobRecord(
        job_id=job_id,
        tenant_id="bench",
        tier=messages_pb2.TIER_BULK,
        accepted_at=now_ts(),
        envelope_from="news@bench.test",
        recipient_count=n,
        recipients_format=messages_pb2.RECIPIENTS_FORMAT_JSON,
        payload_ref=await store.put(job_id, payload.SerializeToString()),
        recipients_ref=await store.put(f"{job_id}.recipients", orjson.dumps(rows)),
    )
    batch = messages_pb2.JobBatch(batch_id=job_id, jobs=[job])
    await js.publish(names.job_subject(job.tier, job_id), batch.SerializeToString())
    await nc.close()


async def count(cfg: Config, stream: str) -> int:
    nc = await connect(cfg, "bench")
    try:
        return int((await nc.jetstream().stream_info(stream)).state.messages)
    finally:
        await nc.close()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipients", type=int, default=100_000)
    ap.add_argument("--domains", type=int, default=1000)
    ap.add_argument("--blasts", type=int, default=2)
    ap.add_argument("--processes", type=int, default=1)
    args = ap.parse_args()
    srv, tmp = start_nats()
    try:
        cfg = config_mod.replace(config_mod.Config(), nats={"url": srv.url})
        nc = await connect(cfg, "bench")
        await ensure_layout(nc.jetstream(), cfg)
        await nc.close()
        for _ in range(args.blasts):
            await enqueue_blast(cfg, args.recipients, args.domains)
        total = args.recipients * args.blasts
        env = dict(os.environ, SLUICE_NATS__URL=srv.url)
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sluice.cli", "--log-level", "WARNING", "expander", env=env
            )
            for _ in range(args.processes)
        ]
        # Time from the first pointer to the last (process start-up excluded).
        while await count(cfg, names.MAIL_STREAM) == 0:
            await asyncio.sleep(0.01)
        start = time.perf_counter()
        # Done when every job is acknowledged (its markers are purged by then).
        while await count(cfg, names.JOBS_STREAM) > 0:
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - start
        pointers = await count(cfg, names.MAIL_STREAM)
        assert pointers == total, f"{pointers} pointers for {total} recipients"
        for p in procs:
            p.terminate()
            await p.wait()
        print(machine())
        print(
            f"expander: {args.blasts} blasts x {args.recipients} recipients over "
            f"{args.domains} domains, {args.processes} process(es): {pointers} pointers in "
            f"{elapsed:.2f} s = {pointers / elapsed:,.0f} pointers/s"
        )
    finally:
        srv.stop()
        tmp.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
