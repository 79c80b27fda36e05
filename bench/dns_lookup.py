"""CPU per MX lookup of the shared resolver (sluice/resolver.py), against a DNS server on
loopback in another process (its CPU is not counted).

    .venv/bin/python -m bench.dns_lookup [--lookups 2000] [--rounds 4]

Every lookup asks for a new domain (no cache hit): `mx` gathered 50 at a time (a deliverer's
connection loops), and `mx_many` with 64 at a time (how the scheduler resolves a long tail of
domains).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time

from bench.common import machine
from sluice.config import DnsConfig, Duration
from sluice.devdns import DnsServer
from sluice.natsserver import free_port
from sluice.resolver import MxHost, Resolver


def _serve(port: int) -> None:
    async def run() -> None:
        server = DnsServer({}, catch_all_mx="mx.catch.test")
        await server.start("127.0.0.1", port)
        await asyncio.Event().wait()

    asyncio.run(run())


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lookups", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    port = free_port()
    server = multiprocessing.Process(target=_serve, args=(port,), daemon=True)
    server.start()
    try:
        resolver = Resolver(DnsConfig(nameservers=("127.0.0.1",), port=port, timeout=Duration(2)))
        for _ in range(50):  # (until the server answers)
            try:
                await resolver.mx("warm.test")
                break
            except Exception:
                await asyncio.sleep(0.1)
        print(machine())
        for rnd in range(args.rounds):
            figures = []
            for way in ("mx", "mx_many"):
                cpu0, wall0 = time.process_time(), time.monotonic()
                for i in range(0, args.lookups, 64 if way == "mx_many" else 50):
                    if way == "mx_many":
                        batch = [
                            f"{way}{rnd}x{j}.bench.test"
                            for j in range(i, min(i + 64, args.lookups))
                        ]
                        found = [h async for came in resolver.mx_many(batch) for _, h in came]
                    else:
                        found = await asyncio.gather(
                            *(resolver.mx(f"{way}{rnd}x{j}.bench.test") for j in range(i, i + 50))
                        )
                    assert all(hosts == [MxHost(10, "mx.catch.test")] for hosts in found)
                cpu = (time.process_time() - cpu0) / args.lookups * 1e6
                wall = time.monotonic() - wall0
                figures.append(f"{way} {cpu:.0f} µs ({wall:.2f} s)")
            print(
                f"round {rnd + 1}: CPU per MX lookup of {args.lookups} new domains: "
                + ", ".join(figures)
            )
    finally:
        server.terminate()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
