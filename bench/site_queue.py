"""CPU per transaction of the deliverer's site-queue hop: the way hash-bucket mail goes from
the lane that fetched it to the connection loops of its site (deliverer/worker.py: SiteQueue,
_enqueue, _staff, _site_loop), apart from fetching and SMTP.

    .venv/bin/python -m bench.site_queue [--transactions 200000] [--sites 10 60] [--rounds 3]

A lane queues the transactions round robin over the sites, 32 at a time (a fetched batch),
on a real Deliverer whose sites hold live leases; delivery is stubbed (it yields once, as a
reply awaited would). With 10 sites every queue stays busy; with 60 (under the 64 loops a
process runs) each loop mostly waits idle between transactions, as in a long tail of small
sites. NATS is real (the Deliverer needs it) but carries nothing here.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import time
from typing import Any, cast

from bench.common import machine, start_nats
from deliverer.schedclient import SchedulerClient
from deliverer.worker import Deliverer, Group, LeaseWork, SiteQueue
from sluice import config as config_mod
from sluice import names
from sluice.nats_layout import connect, ensure_layout
from sluice.outcomes import BatchPublisher
from sluice.resolver import Resolver
from sluice.store import open_store
from sluice.v1 import messages_pb2, scheduler_pb2

_BATCH = 32


class _Scheduler:
    """Takes releases (a loop idle for the linger gives its lease back); grants nothing (a
    queue that outgrows its lease asks for more of the site)."""

    outcome_counts = True

    async def AcquireLeases(  # noqa: N802 - as on the client
        self,
        request: scheduler_pb2.AcquireLeasesRequest,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> scheduler_pb2.AcquireLeasesResponse:
        return scheduler_pb2.AcquireLeasesResponse()

    async def ReleaseLeases(  # noqa: N802
        self,
        request: scheduler_pb2.ReleaseLeasesRequest,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> scheduler_pb2.ReleaseLeasesResponse:
        return scheduler_pb2.ReleaseLeasesResponse()


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _round(deliverer: Deliverer, transactions: int, sites: int) -> float:
    """Microseconds of CPU per transaction through the hop."""
    done = 0
    finished = asyncio.Event()

    async def paced(group: Group, work: LeaseWork, conn: Any) -> Any:
        nonlocal done
        await asyncio.sleep(0)
        done += 1
        if done == transactions:
            finished.set()
        return conn

    deliverer._paced = paced  # type: ignore[method-assign]
    site_ids = [f"site{i}" for i in range(sites)]
    for i, site in enumerate(site_ids):
        lease = scheduler_pb2.Lease(lease_id=f"lease{i}", site_id=site, max_connections=3)
        sq = deliverer._site_queues[site] = SiteQueue(site)
        sq.leases.append(LeaseWork(lease))
    bulk = messages_pb2.TIER_BULK
    groups: list[Group] = [
        [(cast(Any, None), messages_pb2.DeliveryPointer(domain=f"d{i % sites}.test", tier=bulk))]
        for i in range(transactions)
    ]
    alive = time.monotonic()
    before = _cpu()
    for start in range(0, transactions, _BATCH):
        for i in range(start, min(start + _BATCH, transactions)):
            site = site_ids[i % sites]
            if not deliverer._enqueue(site, groups[i], alive):
                await deliverer._enqueue_when_room(site, groups[i], alive, time.monotonic() + 5)
        await asyncio.sleep(0)  # (the lane fetches its next batch)
    await asyncio.wait_for(finished.wait(), 120)
    used = _cpu() - before
    for task in list(deliverer._site_tasks):
        task.cancel()
    await asyncio.gather(*deliverer._site_tasks, return_exceptions=True)
    deliverer._site_queues.clear()
    return used / transactions * 1e6


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--transactions", type=int, default=200_000)
    ap.add_argument("--sites", type=int, nargs="+", default=[10, 60])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(machine())
    srv, tmp = start_nats()
    try:
        cfg = config_mod.load(None, environ={"SLUICE_NATS__URL": srv.url})
        nc = await connect(cfg, "bench")
        js = nc.jetstream()
        await ensure_layout(js, cfg)
        for sites in args.sites:
            figures = []
            for _ in range(args.rounds):
                deliverer = Deliverer(
                    cfg,
                    js,
                    open_store(cfg.store, js),
                    Resolver(cfg.dns),
                    cast(SchedulerClient, _Scheduler()),
                    BatchPublisher(nc, names.EVENTS_STREAM),
                )
                figures.append(await _round(deliverer, args.transactions, sites))
            print(
                f"{sites} sites, {args.transactions} transactions: "
                + ", ".join(f"{f:.2f}" for f in figures)
                + f" us of CPU per transaction (median {statistics.median(figures):.2f})"
            )
        await nc.close()
    finally:
        srv.stop()
        tmp.cleanup()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
