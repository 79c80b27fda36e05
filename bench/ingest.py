"""Ingest benchmarks: everything on this machine (nats-server with file storage, one ingest
process, the load generator in this process). No expander or deliverer runs: this measures
accepting (durable 202s), not delivery.

    .venv/bin/python -m bench.ingest [all|blast-latency|blast-rate|stream|single]

- blast-latency: 202 latency of one blast of 1k, 10k and 100k recipients (HTTP and gRPC).
- blast-rate:    recipients/s accepted through back-to-back 100k-recipient blasts.
- stream:        messages/s accepted through SendStream (several streams in parallel).
- single:        single sends at 64 concurrent requests: req/s, p50 and p99 (HTTP, gRPC).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import grpc
import orjson

from bench.common import machine, start_nats
from sluice import config as config_mod
from sluice.config import Config
from sluice.nats_layout import connect, ensure_layout
from sluice.natsserver import free_port
from sluice.tenants import TenantStore, now_ts
from sluice.v1 import ingest_pb2, ingest_pb2_grpc, messages_pb2, tenant_pb2

DOMAINS = 1000


def blast_json(n: int) -> bytes:
    return orjson.dumps(
        {
            "from": {"email": "news@bench.test"},
            "subject": "Hi {{name}}",
            "html": "<p>" + "x" * 50_000 + "</p>",
            "recipients": [
                {"email": f"user{i}@d{i % DOMAINS}.test", "substitutions": {"name": f"U{i}"}}
                for i in range(n)
            ],
        }
    )


def blast_proto(n: int) -> ingest_pb2.SendBlastRequest:
    req = ingest_pb2.SendBlastRequest(subject="Hi {{name}}", html="<p>" + "x" * 50_000 + "</p>")
    getattr(req, "from").email = "news@bench.test"
    for i in range(n):
        req.recipients.add(email=f"user{i}@d{i % DOMAINS}.test", substitutions={"name": f"U{i}"})
    return req


def single_proto(i: int) -> ingest_pb2.SendRequest:
    req = ingest_pb2.SendRequest(
        to=[messages_pb2.Address(email=f"user{i}@d{i % DOMAINS}.test")],
        subject="Your code",
        text=f"code {i}",
    )
    getattr(req, "from").email = "codes@bench.test"
    return req


SINGLE_JSON = orjson.dumps(
    {
        "from": {"email": "codes@bench.test"},
        "to": [{"email": "user@d1.test"}],
        "subject": "Your code",
        "text": "code 123456",
        "tier": "critical",
    }
)


class Bench:
    def __init__(self, cfg: Config, key: str) -> None:
        self.cfg = cfg
        self.key = key
        self.http = f"http://{cfg.ingest.http_listen}"
        self.auth = (("authorization", f"Bearer {key}"),)
        opts = [
            ("grpc.max_send_message_length", 256 * 2**20),
            ("grpc.max_receive_message_length", 256 * 2**20),
        ]
        self.channel = grpc.aio.insecure_channel(cfg.ingest.grpc_listen, opts)
        self.stub = ingest_pb2_grpc.IngestServiceStub(self.channel)
        # Separate connections (distinct local subchannels), so that SO_REUSEPORT can spread
        # the streams over several ingest processes.
        self.channels = [
            grpc.aio.insecure_channel(
                cfg.ingest.grpc_listen, [*opts, ("grpc.use_local_subchannel_pool", 1)]
            )
            for _ in range(4)
        ]

    async def blast_latency(self) -> None:
        async with aiohttp.ClientSession() as s:
            for n in (1_000, 10_000, 100_000):
                body = blast_json(n)
                req = blast_proto(n)
                http_ms, grpc_ms = [], []
                for _ in range(3):
                    t = time.perf_counter()
                    async with s.post(
                        f"{self.http}/v1/blasts",
                        data=body,
                        headers={
                            "Authorization": f"Bearer {self.key}",
                            "Content-Type": "application/json",
                        },
                    ) as r:
                        assert r.status == 202, await r.text()
                        await r.read()
                    http_ms.append((time.perf_counter() - t) * 1000)
                    t = time.perf_counter()
                    await self.stub.SendBlast(req, metadata=self.auth)
                    grpc_ms.append((time.perf_counter() - t) * 1000)
                print(
                    f"blast 202 latency, {n:>7,} recipients ({len(body) / 1e6:.1f} MB JSON): "
                    f"HTTP median {statistics.median(http_ms):6.0f} ms, "
                    f"gRPC median {statistics.median(grpc_ms):6.0f} ms (3 runs each)"
                )

    async def blast_rate(self, seconds: float = 15.0) -> None:
        req = blast_proto(100_000)
        body = blast_json(100_000)
        for label in ("gRPC", "HTTP"):
            accepted = 0
            start = time.perf_counter()
            async with aiohttp.ClientSession() as s:
                while time.perf_counter() - start < seconds:
                    if label == "gRPC":
                        resp = await self.stub.SendBlast(req, metadata=self.auth)
                        accepted += resp.recipient_count
                    else:
                        async with s.post(
                            f"{self.http}/v1/blasts",
                            data=body,
                            headers={"Authorization": f"Bearer {self.key}"},
                        ) as r:
                            assert r.status == 202
                            await r.read()
                            accepted += 100_000
            rate = accepted / (time.perf_counter() - start)
            print(
                f"blast rate ({label}, 100k-recipient blasts back to back, one client): "
                f"{rate:,.0f} recipients/s = {rate * 60 / 1e6:.1f} M/min"
            )

    async def stream(self, seconds: float = 10.0, streams: int = 4) -> None:
        stubs = [ingest_pb2_grpc.IngestServiceStub(c) for c in self.channels]
        count = 0
        errors = 0
        start = time.perf_counter()
        msgs = [single_proto(i) for i in range(1000)]

        async def one(stub: ingest_pb2_grpc.IngestServiceAsyncStub) -> None:
            nonlocal count, errors

            frames = [
                ingest_pb2.SendStreamRequest(sequence=i * 100, messages=msgs[i : i + 100])
                for i in range(0, len(msgs), 100)
            ]

            async def requests() -> AsyncIterator[ingest_pb2.SendStreamRequest]:
                # Frames of 100 messages (the sequences only need to match results here).
                while time.perf_counter() - start < seconds:
                    for frame in frames:
                        yield frame

            async for resp in stub.SendStream(requests(), metadata=self.auth):
                for r in resp.results:
                    if r.HasField("error"):
                        errors += 1
                    else:
                        count += 1

        await asyncio.gather(*(one(stubs[i % len(stubs)]) for i in range(streams)))
        elapsed = time.perf_counter() - start
        print(
            f"stream: {streams} SendStreams, {count:,} accepted ({errors} errors) in "
            f"{elapsed:.1f} s = {count / elapsed:,.0f} msgs/s = "
            f"{count / elapsed * 60 / 1e6:.2f} M/min"
        )

    async def single(self, total: int = 6000, concurrency: int = 64) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:

            async def http_one(i: int) -> None:
                async with s.post(
                    f"{self.http}/v1/send",
                    data=SINGLE_JSON,
                    headers={
                        "Authorization": f"Bearer {self.key}",
                        "Content-Type": "application/json",
                    },
                ) as r:
                    assert r.status == 202, await r.text()
                    await r.read()

            await self._closed_loop("HTTP POST /v1/send", http_one, total, concurrency)
        reqs = [single_proto(i) for i in range(100)]

        async def grpc_one(i: int) -> None:
            await self.stub.Send(reqs[i % 100], metadata=self.auth)

        await self._closed_loop("gRPC Send", grpc_one, total, concurrency)

    @staticmethod
    async def _closed_loop(
        label: str, fn: Callable[[int], Awaitable[None]], total: int, concurrency: int
    ) -> None:
        latencies: list[float] = []
        it = iter(range(total))

        async def worker() -> None:
            for i in it:
                t = time.perf_counter()
                await fn(i)
                latencies.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        latencies.sort()
        p50 = latencies[len(latencies) // 2] * 1000
        p99 = latencies[int(len(latencies) * 0.99)] * 1000
        print(
            f"single sends, {label}, {concurrency} concurrent: {total / elapsed:,.0f} req/s, "
            f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"
        )


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ingest-processes", type=int, default=1)
    ap.add_argument(
        "what",
        nargs="?",
        default="all",
        choices=["all", "blast-latency", "blast-rate", "stream", "single"],
    )
    args = ap.parse_args()
    srv, tmp = start_nats()
    procs: list[asyncio.subprocess.Process] = []
    try:
        cfg = config_mod.replace(
            config_mod.Config(),
            nats={"url": srv.url, "jobs_max_bytes": 8 * 2**30},
            ingest={
                "http_listen": f"127.0.0.1:{free_port()}",
                "grpc_listen": f"127.0.0.1:{free_port()}",
            },
        )
        nc = await connect(cfg, "bench")
        await ensure_layout(nc.jetstream(), cfg)
        store = TenantStore(nc.jetstream())
        await store.put_tenant(
            tenant_pb2.Tenant(
                tenant_id="bench", allowed_from_domains=["bench.test"], created_at=now_ts()
            )
        )
        key, _ = await store.create_key("bench")
        await nc.close()
        env = dict(
            os.environ,
            SLUICE_NATS__URL=srv.url,
            SLUICE_NATS__JOBS_MAX_BYTES=str(8 * 2**30),
            SLUICE_INGEST__HTTP_LISTEN=cfg.ingest.http_listen,
            SLUICE_INGEST__GRPC_LISTEN=cfg.ingest.grpc_listen,
        )
        for _ in range(args.ingest_processes):
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "sluice.cli",
                    "--log-level",
                    "WARNING",
                    "ingest",
                    env=env,
                )
            )
        bench = Bench(cfg, key)
        for _ in range(100):
            try:
                async with aiohttp.ClientSession() as s, s.get(f"{bench.http}/healthz"):
                    break
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
        print(machine())
        print(
            f"ingest: {args.ingest_processes} process(es) (uvloop, SO_REUSEPORT); nats-server "
            "file storage; load generator in another process; no expander or deliverer"
        )
        todo: dict[str, Callable[[], Awaitable[Any]]] = {
            "blast-latency": bench.blast_latency,
            "blast-rate": bench.blast_rate,
            "stream": bench.stream,
            "single": bench.single,
        }
        for name, fn in todo.items():
            if args.what in ("all", name):
                await fn()
        for channel in [bench.channel, *bench.channels]:
            await channel.close(grace=None)
    finally:
        for proc in procs:
            proc.terminate()
            await proc.wait()
        srv.stop()
        tmp.cleanup()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
