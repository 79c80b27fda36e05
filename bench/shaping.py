"""Shaping benchmark: N sites with M messages each, limits from a generated shaping file;
prints the delivery rate and, per site, the most concurrent connections the receiving
server ever saw against the site's limit. CPU (the Sluice processes' and nats-server's) is
counted from the blast's submission, once the processes have started.

    .venv/bin/python -m bench.shaping [--sites N] [--messages M] [--deliverers D]
    .venv/bin/python -m bench.shaping --zipf-domains 10000 --total 30000 [--zipf 1.0]
                                      [--hosted 0.8] [--providers 20] [--warm]
                                      [--progress] [--log-level INFO] [--ratio ROUNDS]
                                      [--sink light|aiosmtpd]

The second form sends one blast of --total messages over that many domains, drawn Zipf-
distributed, and also prints the CPU time the Sluice processes spent per message and the
most mail consumers JetStream ever held: run it with 10 and with 10000 domains to compare
the per-message cost, or add `--ratio ROUNDS` to have it run both, in rounds of four runs
(10 domains, the tail, the tail, 10 domains: a drift of the machine's speed within a round
cancels out), and print each round's ratio and the median. The ten most popular domains are
big providers, each with its own MX (a site of its own). Of the long tail, a fraction
--hosted has its MX at one of --providers hosting providers (drawn Zipf-distributed too: a
few big ones), as most small domains do (Google Workspace, Microsoft 365, hosting
companies), so the domains of one provider are one site; the rest have an MX of their own.
--hosted 0 gives every domain its own MX: the worst case, one site (MX lookup, address
lookups, connection) per domain. Every site has 5 connections; the sink counts connections
per site.

nats-server's store goes in a temporary directory under TMPDIR, and the file system there
matters (see bench.common.filesystem). To measure on a journaled ext4 when the machine's is
not, as the thirteenth session did (nats-server wants room for the streams' max_bytes: an
8 GiB file system was refused):

    truncate -s 200G /work/ext4j.img && mkfs.ext4 -q -F /work/ext4j.img
    mkdir -p /mnt/j && mount -o loop /work/ext4j.img /mnt/j
    TMPDIR=/mnt/j .venv/bin/python -m bench.shaping ...

Everything runs here: nats-server, the Sluice services as processes (ingest, expander,
scheduler, D deliverers), a DNS server giving each site its own MX host, and an SMTP sink
that counts connections per site (by the domain of a connection's first RCPT), offers
PIPELINING and answers each DATA after 2 ms: bench/sink.py, light enough not to take the
cores from what it measures, or with `--sink aiosmtpd` the aiosmtpd server of the sessions
before the thirteenth (about 0.3 ms of CPU per message).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiosmtpd.smtp import SMTP, Envelope, Session

from bench.common import machine, nats_traffic, process_cpu_seconds, start_nats
from bench.sink import SinkProtocol, SiteCounter
from sluice import config as config_mod
from sluice.devdns import DnsServer
from sluice.nats_layout import connect, ensure_layout
from sluice.natsserver import NatsServer, free_port
from sluice.tenants import TenantStore, now_ts
from sluice.v1 import tenant_pb2


class AiosmtpdSink:
    """The sink of the earlier sessions (`--sink aiosmtpd`): aiosmtpd, counting into a
    SiteCounter. It takes about 0.3 ms of CPU per message from the cores Sluice runs on."""

    def __init__(self, counter: SiteCounter) -> None:
        self.counter = counter

    async def handle_EHLO(  # noqa: N802
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """PIPELINING offered, as the big providers' and most MTAs' servers do (aiosmtpd
        reads commands line by line, so it answers pipelined ones in turn)."""
        session.host_name = hostname
        return [responses[0], "250-PIPELINING", *responses[1:]]

    async def handle_RCPT(  # noqa: N802
        self, server: SMTP, session: Session, envelope: Envelope, address: str, _: Any
    ) -> str:
        if getattr(session, "site", None) is None:
            session.site = self.counter.site_of[address.rpartition("@")[2]]  # type: ignore[attr-defined]
            self.counter.opened(session.site)  # type: ignore[attr-defined]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        await asyncio.sleep(0.002)  # a receiving server takes a little time
        self.counter.arrived(session.site, envelope.rcpt_tos)  # type: ignore[attr-defined]
        return "250 OK"


class CountingSMTP(SMTP):
    def __init__(self, handler: AiosmtpdSink) -> None:
        super().__init__(handler)
        self.counter = handler.counter

    def connection_lost(self, exc: Exception | None) -> None:
        site = getattr(self.session, "site", None) if self.session else None
        if site is not None:
            self.counter.closed(site)
        super().connection_lost(exc)


@dataclass
class Measured:
    """One run's figures: CPU per message (ms) of the Sluice processes and nats-server
    together, and the delivery rate."""

    cpu_ms: float
    rate: float


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--messages", type=int, default=300)
    ap.add_argument("--deliverers", type=int, default=2)
    ap.add_argument("--zipf-domains", type=int, default=0)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--total", type=int, default=30_000)
    ap.add_argument("--hosted", type=float, default=0.0)
    ap.add_argument("--providers", type=int, default=20)
    ap.add_argument(
        "--warm", action="store_true", help="measure a second blast to the same domains"
    )
    ap.add_argument(
        "--ratio",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="compare the blast with the same blast over 10 domains, ROUNDS rounds",
    )
    ap.add_argument(
        "--progress",
        action="store_true",
        help="print arrivals, connections and JetStream's pending and in-hand mail every 2 s",
    )
    ap.add_argument(
        "--idle-after",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="after the blast, measure each process's CPU over SECONDS with no mail left "
        "(the cost that grows with time, not with mail: consumers, leases, polls)",
    )
    ap.add_argument("--log-level", default="WARNING", help="of the Sluice processes")
    ap.add_argument(
        "--sink",
        choices=["light", "aiosmtpd"],
        default="light",
        help="the receiving SMTP server: bench/sink.py (default), or aiosmtpd as in the "
        "sessions before the thirteenth (it takes about 0.3 ms of CPU per message from the "
        "same cores)",
    )
    args = ap.parse_args()
    if args.ratio:
        await ratio(args)
    else:
        await shape(args)


async def ratio(args: argparse.Namespace) -> None:
    """Rounds of the 10-domain case (A) and the long tail (B) in the order A B B A: a drift
    of the machine's speed within a round (this machine is shared; its speed moves by a
    third over an hour) cancels out of the round's ratio, B's CPU per message over A's."""
    tail = argparse.Namespace(**{**vars(args), "zipf_domains": args.zipf_domains or 10_000})
    ten = argparse.Namespace(**{**vars(tail), "zipf_domains": 10, "hosted": 0.0})
    ratios = []
    for r in range(1, args.ratio + 1):
        a1 = await shape(ten, quiet=True)
        b1 = await shape(tail, quiet=True)
        b2 = await shape(tail, quiet=True)
        a2 = await shape(ten, quiet=True)
        ratios.append((b1.cpu_ms + b2.cpu_ms) / (a1.cpu_ms + a2.cpu_ms))
        print(
            f"round {r}: CPU per message, 10 domains {a1.cpu_ms:.3f} / {a2.cpu_ms:.3f} ms, "
            f"{tail.zipf_domains} domains {b1.cpu_ms:.3f} / {b2.cpu_ms:.3f} ms: "
            f"{ratios[-1]:.2f}x",
            flush=True,
        )
    print(machine())
    print(
        f"the long tail's CPU per message against the 10-domain case's, {tail.total} "
        f"messages, {args.deliverers} deliverer processes: "
        + ", ".join(f"{x:.2f}x" for x in ratios)
        + f"; median {statistics.median(ratios):.2f}x"
        + (f"; mean {interval(ratios)}" if len(ratios) > 1 else "")
    )


# Student's t, two-sided 95 %, by degrees of freedom (2.0 beyond 20: within 5 %).
_T95 = [12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23]
_T95 += [2.20, 2.18, 2.16, 2.14, 2.13, 2.12, 2.11, 2.10, 2.09, 2.09]


def interval(xs: list[float]) -> str:
    """The mean of `xs` and its 95 % confidence interval (Student's t): with rounds this
    noisy, whether a target is met is a question about the mean, not about any one round."""
    mean, n = statistics.mean(xs), len(xs)
    half = (_T95[n - 2] if n - 2 < len(_T95) else 2.0) * statistics.stdev(xs) / n**0.5
    return f"{mean:.3f}x (95 % interval {mean - half:.3f}-{mean + half:.3f}x)"


async def shape(args: argparse.Namespace, quiet: bool = False) -> Measured:
    """One run: the full report, or (quiet) a line of it."""
    async with contextlib.AsyncExitStack() as cleanup:  # (what started, if a step fails)
        tmp = Path(tempfile.mkdtemp(prefix="sluice-shaping-"))
        cleanup.callback(shutil.rmtree, tmp, ignore_errors=True)
        monitor = free_port()
        srv, store_dir = start_nats(monitor_port=monitor)
        cleanup.callback(store_dir.cleanup)
        cleanup.callback(srv.stop)
        return await _shape(args, quiet, tmp, srv, monitor, cleanup)


async def _shape(
    args: argparse.Namespace,
    quiet: bool,
    tmp: Path,
    srv: NatsServer,
    monitor: int,
    cleanup: contextlib.AsyncExitStack,
) -> Measured:
    assert srv.proc is not None
    nats_pid = srv.proc.pid
    sink = SiteCounter()
    loop = asyncio.get_running_loop()
    if args.sink == "aiosmtpd":
        handler = AiosmtpdSink(sink)
        smtp_server = await loop.create_server(lambda: CountingSMTP(handler), "127.0.0.1", 0)
    else:
        smtp_server = await loop.create_server(lambda: SinkProtocol(sink), "127.0.0.1", 0)
    cleanup.callback(smtp_server.close)
    smtp_port = smtp_server.sockets[0].getsockname()[1]
    mx = {}  # domain -> its MX host
    if args.zipf_domains:
        domains = [f"d{i}.zipf.test" for i in range(args.zipf_domains)]
        rng = random.Random(7)
        weights = [1 / (k + 1) ** args.zipf for k in range(len(domains))]
        rcpt_domains = rng.choices(domains, weights, k=args.total)
        providers = [f"mx.p{j}.hosting.test" for j in range(args.providers)]
        provider_weights = [1 / (k + 1) for k in range(len(providers))]
        for i, d in enumerate(domains):
            hosted = i >= 10 and rng.random() < args.hosted
            mx[d] = rng.choices(providers, provider_weights)[0] if hosted else f"mx.{d}"
    else:
        domains = [f"site{i}.test" for i in range(args.sites)]
        rcpt_domains = [domains[i % args.sites] for i in range(args.sites * args.messages)]
        mx = {d: f"mx.{d}" for d in domains}
    sink.site_of = mx  # a site is its MX host here
    sites = sorted(set(mx.values()))
    limits = (
        dict.fromkeys(sites, 5)
        if args.zipf_domains
        else {mx[d]: 1 + i % 5 for i, d in enumerate(domains)}
    )
    records: dict[str, list[tuple[str, str]]] = {}
    for d in domains:
        records[d] = [("MX", f"10 {mx[d]}.")]
    for host in sites:
        records[host] = [("A", "127.0.0.1")]
    dns = DnsServer(records)
    dns_port = await dns.start()
    cleanup.callback(dns.close)
    shaping = tmp / "shaping.toml"
    shaping.write_text(
        "[default]\nmax_connections = 5\n\n"
        if args.zipf_domains
        else "".join(f'[domain."{d}"]\nmax_connections = {limits[mx[d]]}\n\n' for d in domains)
    )
    http, sched = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = dict(
        os.environ,
        SLUICE_NATS__URL=srv.url,
        SLUICE_INGEST__HTTP_LISTEN=http,
        SLUICE_INGEST__GRPC_LISTEN=f"127.0.0.1:{free_port()}",
        SLUICE_SCHEDULER__LISTEN=sched,
        SLUICE_SCHEDULER__SHAPING=str(shaping),
        SLUICE_DELIVERER__SCHEDULER=sched,
        SLUICE_DELIVERER__SMTP_PORT=str(smtp_port),
        SLUICE_DNS__NAMESERVERS="127.0.0.1",
        SLUICE_DNS__PORT=str(dns_port),
        SLUICE_INGEST__MAX_BLAST_RECIPIENTS="1000000",
    )
    cfg = config_mod.load(None, environ=env)
    nc = await connect(cfg, "bench")
    await ensure_layout(nc.jetstream(), cfg)
    tenants = TenantStore(nc.jetstream())
    await tenants.put_tenant(
        tenant_pb2.Tenant(
            tenant_id="bench", created_at=now_ts(), allowed_from_domains=["bench.test"]
        )
    )
    key, _ = await tenants.create_key("bench")
    await nc.close()
    procs: list[asyncio.subprocess.Process] = []
    cleanup.push_async_callback(_stop, procs)
    for name in ["ingest", "expander", "scheduler", *["deliverer"] * args.deliverers]:
        procs.append(
            await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sluice.cli", "--log-level", args.log_level, name, env=env
            )
        )
    total = len(rcpt_domains)
    nc = await connect(cfg, "bench-consumers")
    most_consumers = 0
    # Consumers seen at each poll of the blast, and those of them with no mail stored or
    # in hand: every consumer of the stream costs nats-server work on every ack.
    polled = [0, 0, 0]  # polls, consumers, idle consumers
    # Pointers JetStream handed out, redeliveries included (mail handed back, expired
    # acks): a consumer's delivered sequence counts every delivery. Read at every poll:
    # the scheduler deletes idle consumers, and one made again starts from 0.
    last_seq: dict[str, int] = {}
    gone_seqs = 0

    def handed_out() -> int:
        return gone_seqs + sum(last_seq.values())

    async def poll() -> list[Any]:
        """The mail consumers now; counts them and their deliveries."""
        nonlocal most_consumers, gone_seqs
        infos = [
            i for i in await nc.jetstream().consumers_info("MAIL") if i.name.startswith("mail_")
        ]
        most_consumers = max(most_consumers, len(infos))
        for i in infos:
            seq = i.delivered.consumer_seq or 0 if i.delivered else 0
            if seq < last_seq.get(i.name, 0):  # (deleted and made again)
                gone_seqs += last_seq[i.name]
            last_seq[i.name] = seq
        return infos

    async def blast(s: aiohttp.ClientSession, prefix: str) -> None:
        """Send the blast (recipients named with `prefix`) and wait for every arrival."""
        body = {
            "from": {"email": "news@bench.test"},
            "subject": "s",
            "text": "x" * 2000,
            "recipients": [{"email": f"{prefix}{i}@{d}"} for i, d in enumerate(rcpt_domains)],
        }
        async with s.post(
            f"http://{http}/v1/blasts", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as r:
            assert r.status == 202, await r.text()
        start = shown = time.monotonic()
        polled[:] = [0, 0, 0]
        while len(sink.seen) < total and time.monotonic() - start < 900:
            infos = await poll()
            polled[0] += 1
            polled[1] += len(infos)
            polled[2] += sum(1 for i in infos if not (i.num_pending or i.num_ack_pending))
            if args.progress and time.monotonic() - shown >= 2.0:
                shown = time.monotonic()
                print(
                    f"  {shown - start:5.1f} s: {len(sink.seen)} arrived, "
                    f"{sum(sink.active.values())} connections, mail consumers "
                    f"{len(infos)}: {sum(i.num_pending or 0 for i in infos)} pending, "
                    f"{sum(i.num_ack_pending or 0 for i in infos)} in hand, "
                    f"{sum(i.num_redelivered or 0 for i in infos)} of them redelivered",
                    flush=True,
                )
            await asyncio.sleep(0.5)
        await poll()

    async with aiohttp.ClientSession() as s:
        for _ in range(100):  # until ingest answers (any status)
            try:
                async with s.get(f"http://{http}/v1/blasts"):
                    break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.2)
        # Until the processes have started (imports, connections): their CPU stays flat.
        for _ in range(60):
            before = sum(process_cpu_seconds(p.pid) for p in procs)
            await asyncio.sleep(0.5)
            if sum(process_cpu_seconds(p.pid) for p in procs) - before < 0.05:
                break
        if args.warm:  # the same domains once before, unmeasured: caches are warm
            await blast(s, "w")
            sink.reset()
            await asyncio.sleep(1.0)  # (its last connections close)
        # CPU is counted from here: the processes' start (imports, connections) is not
        # a cost per message.
        cpu0 = {p.pid: process_cpu_seconds(p.pid) for p in procs}
        nats0 = process_cpu_seconds(nats_pid)
        handed_before = handed_out()
        await blast(s, "u")
    handed = handed_out() - handed_before
    idle = ""
    if args.idle_after:
        await asyncio.sleep(1.0)  # (the last transactions settle)
        pids = [p.pid for p in procs] + [nats_pid]
        idle0 = {pid: process_cpu_seconds(pid) for pid in pids}
        await asyncio.sleep(args.idle_after)
        idle_names = ["ingest", "expander", "scheduler", *["deliverer"] * args.deliverers, "nats"]
        idle = "; idle CPU per second: " + ", ".join(
            f"{name} {(process_cpu_seconds(pid) - idle0[pid]) / args.idle_after * 1e3:.1f} ms"
            for name, pid in zip(idle_names, pids, strict=True)
        )
    await nc.close()
    elapsed = sink.last - sink.first
    cpu = {p.pid: process_cpu_seconds(p.pid) - cpu0[p.pid] for p in procs}
    cpu[nats_pid] = process_cpu_seconds(nats_pid) - nats0
    measured = Measured(sum(cpu.values()) / total * 1e3, sink.delivered / max(elapsed, 1e-9))
    names = ["ingest", "expander", "scheduler", *["deliverer"] * args.deliverers]
    by_process = [*zip(names, (p.pid for p in procs), strict=True), ("nats", nats_pid)]
    over = [site for site in sites if sink.peak[site] > limits[site]]
    polls = max(polled[0], 1)
    mean_consumers = f"on average {polled[1] / polls:.1f}, {polled[2] / polls:.1f} of them idle"
    if quiet:
        print(
            f"  {len(set(rcpt_domains))} domains on {len({mx[d] for d in rcpt_domains})} "
            f"sites: {measured.rate:,.0f} msgs/s, CPU {measured.cpu_ms:.3f} ms per message ("
            + ", ".join(f"{name} {cpu[pid] / total * 1e3:.3f}" for name, pid in by_process)
            + f"); {len(sink.seen)} of {total} reached, {sink.duplicates} duplicates, "
            f"{len(over)} sites over their limit, at most {most_consumers} mail consumers"
            f" ({mean_consumers}){idle}",
            flush=True,
        )
        return measured
    print(machine())
    what = (
        f"{len(set(rcpt_domains))} of {args.zipf_domains} domains (Zipf s={args.zipf}) on "
        f"{len({mx[d] for d in rcpt_domains})} sites ({args.hosted:.0%} of the tail hosted "
        f"by {args.providers} providers), {total} messages"
        if args.zipf_domains
        else f"{args.sites} sites x {args.messages} messages"
    ) + (" (measured: a second blast to the same domains, caches warm)" if args.warm else "")
    print(
        f"shaping: {what}, {args.deliverers} deliverer processes: {sink.delivered} "
        f"delivered in {elapsed:.1f} s = {measured.rate:,.0f} msgs/s"
    )
    for name, pid in by_process:
        print(f"  {name:10} CPU {cpu[pid]:7.1f} s = {cpu[pid] / total * 1e3:.3f} ms/msg")
    print(f"  all        CPU {measured.cpu_ms:.3f} ms/msg")
    print(f"most mail consumers at once: {most_consumers} ({mean_consumers})")
    if idle:
        print(idle.removeprefix("; "))
    print(
        f"pointers JetStream handed out: {handed} ({handed - total} more than messages "
        "sent; a lower bound if a consumer was deleted between two polls)"
    )
    print(f"recipients reached: {len(sink.seen)} of {total}, duplicates: {sink.duplicates}")
    print(
        f"connections that carried mail: {sink.connections}, transactions: {sink.delivered}"
        f" ({sink.delivered / max(sink.connections, 1):.1f} per connection)"
    )
    small = [site for site in sites if 0 < sink.site_mail[site] <= 3]
    print(
        f"  of them to sites with at most 3 messages: "
        f"{sum(sink.site_connections[site] for site in small)} ({len(small)} sites); "
        f"to the 10 most connected sites: "
        f"{sum(sorted(sink.site_connections.values())[-10:]) if sink.site_connections else 0}"
    )
    if args.zipf_domains:
        bands = [(1, 3), (4, 10), (11, 30), (31, 100), (101, 1000), (1001, 10**9)]
        print(
            "  by the size of a site's mail: "
            + "; ".join(
                f"{lo}-{hi if hi < 10**9 else ''} messages: {len(ss)} sites, "
                f"{sum(sink.site_mail[s] for s in ss)} messages over "
                f"{sum(sink.site_connections[s] for s in ss)} connections"
                for lo, hi in bands
                if (ss := [s for s in sites if lo <= sink.site_mail[s] <= hi])
            )
        )
    busiest = sorted(sites, key=lambda site: -sink.site_mail[site])[:10]
    for site in busiest if args.zipf_domains else sites:
        flag = "  OVER LIMIT" if sink.peak[site] > limits[site] else ""
        print(
            f"  {site:20} limit {limits[site]}  most connections seen {sink.peak[site]}{flag}"
            f"  ({sink.site_mail[site]} messages over {sink.site_connections[site]} connections)"
        )
    print(f"sites over their limit: {len(over)}")
    # (the same count of NATS messages with more CPU per message is the machine, not the
    # work: how two deliverers were told from one)
    traffic = await nats_traffic(monitor)
    print(
        "NATS messages per recipient, published / received: "
        + ", ".join(
            f"{name.removeprefix('sluice-')} {sent / total:.2f} / {got / total:.2f}"
            for name, (sent, got) in sorted(traffic.items())
            if name.startswith("sluice-")
        )
    )
    asked = Counter(rdtype for _, rdtype in dns.queries)
    print(
        f"DNS queries: {sum(asked.values())} ("
        + ", ".join(f"{rdtype} {n}" for rdtype, n in sorted(asked.items()))
        + f") from {len(dns.clients)} sockets"
    )
    return measured


async def _stop(procs: list[asyncio.subprocess.Process]) -> None:
    for p in procs:
        p.terminate()
        await p.wait()


if __name__ == "__main__":
    asyncio.run(main())
