"""End to end, side by side: Sluice, Postfix as a relay and Haraka as a relay, each taking N
messages (2 KB) and delivering them to the same fast SMTP sink (Postfix's `smtp-sink`), timed
from the first submission to the last arrival at the sink, in one run on this machine.

    .venv/bin/python -m bench.compare [--messages 20000] [--systems sluice,postfix,haraka]
                                      [--dkim both|on|off] [--deliverers 2] [--webhooks]
                                      [--clients N] [--submitter smtp-source|aiosmtplib]
                                      [--sync interval|always] [--rounds 1]

With --rounds N the systems run N times in turn, in --systems order, each round compared
with its own Postfix run (a round whose Postfix run lost messages is left out), and the
ratios of every round are summed up at the end: this machine's speed drifts by a third
within minutes, and one pair of runs can land on either side of a drift. BENCH_LOG_LEVEL
(default WARNING) is the log level of the Sluice processes.

- Sluice: the whole stack as separate processes (nats-server with file storage, ingest,
  expander, scheduler, deliverers; webhooks with --webhooks), messages submitted through the
  gRPC SendStream API (the SDK's `stream()`), delivered through `[dns] routes = *=sink`.
- Postfix: a private instance (its own config and queue directory) relaying everything to
  the sink (`relayhost`), messages submitted over SMTP.
- Haraka: an instance relaying to the sink (`queue/smtp_forward`), submitted likewise.

Needs (not test dependencies): Debian's `postfix` package (smtp-sink, smtp-source and
postfix), and Haraka from npm: `apt-get install postfix` and `npm install --prefix /opt/haraka
Haraka` (or set HARAKA=/path/to/bin/haraka).

The SMTP submission client is Postfix's own C client, `smtp-source`, with `--clients`
connections kept open: by default 8 for Postfix and 256 for Haraka. `--submitter aiosmtplib`
submits from this process in Python instead, as runs before the tenth session did; that
client took 0.42-0.44 ms of CPU per message from the same two cores, and Postfix relayed
12-22 % faster with smtp-source (679 / 706 msgs/s against 604 / 578, interleaved).
smtp-source sends one message to numbered recipients of one domain (`--domains` spreads
only Sluice's recipients; Postfix and Haraka relay everything to the sink either way). Haraka's
smtp_forward relays each message before it answers the client, so its rate is connections
over that round trip: 1,017 msgs/s with 64 connections (60 % of the cores busy), 1,457 with
128, 1,564 with 256 (94 %). Postfix queues first and is bound by its CPU either way (664
msgs/s with 32, 680 with 8). Every figure is printed with the machine it ran on; arrivals at
the sink must equal N for a run to count.
"""

# A benchmark script: blocking calls while nothing else runs on its loop are fine here.
# ruff: noqa: ASYNC220, ASYNC221, ASYNC230, ASYNC240

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib

from bench.common import machine, start_nats
from sluice import config as config_mod
from sluice.client import AsyncClient
from sluice.nats_layout import connect, ensure_layout
from sluice.natsserver import free_port, port_open
from sluice.tenants import TenantStore, now_ts
from sluice.v1 import tenant_pb2

BODY = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 36)[:2000]
FROM = "news@bench.test"


def rcpt(i: int, domains: int) -> str:
    return f"user{i}@d{i % domains}.sink.test"


def mime(i: int, domains: int) -> bytes:
    return (
        f"From: {FROM}\r\nTo: {rcpt(i, domains)}\r\nSubject: Bench {i}\r\n"
        f"Message-ID: <bench.{i}@bench.test>\r\nMIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n\r\n{BODY}\r\n"
    ).encode()


@dataclass
class Result:
    system: str
    features: str
    n: int
    arrived: int
    seconds: float
    submit_seconds: float
    cpu: dict[str, float]
    rss: dict[str, float] | None = None
    machine: float | None = None  # CPU seconds the whole machine was busy meanwhile

    @property
    def rate(self) -> float:
        return self.arrived / self.seconds if self.seconds else 0.0


class Sink:
    """Postfix's smtp-sink with running counters (-c); arrivals read from its output."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self._out = open(workdir / f"sink-{self.port}.out", "wb")
        self._path = workdir / f"sink-{self.port}.out"
        self.proc = subprocess.Popen(
            ["smtp-sink", "-c", "-u", "postfix", f"127.0.0.1:{self.port}", "1024"],
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    def count(self) -> int:
        data = self._path.read_bytes()[-200:]
        found = re.findall(rb"mesg=(\d+)", data)
        return int(found[-1]) if found else 0

    async def wait_ready(self) -> None:
        for _ in range(100):
            if port_open("127.0.0.1", self.port):
                return
            await asyncio.sleep(0.05)
        raise RuntimeError("smtp-sink did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()
        self._out.close()


async def wait_arrivals(sink: Sink, n: int, start: float, limit: float) -> tuple[int, float]:
    """Arrivals at the sink and seconds from `start` to the last one (bounded by `limit`)."""
    last, last_t = 0, time.monotonic()
    while time.monotonic() - start < limit:
        c = sink.count()
        if c != last:
            last, last_t = c, time.monotonic()
        if c >= n:
            break
        if time.monotonic() - last_t > 60:  # nothing for a minute: give up
            break
        await asyncio.sleep(0.05)
    return last, last_t - start


async def smtp_submit(
    port: int, n: int, clients: int, domains: int, submitter: str, work: Path
) -> dict[str, float]:
    """N messages over `clients` reused SMTP connections; the CPU of a client that runs as a
    process of its own (smtp-source), which this process's CPU does not count."""
    if submitter == "smtp-source":
        return {"submitting client (smtp-source)": await _smtp_source(port, n, clients, work)}
    counter = iter(range(n))

    async def worker() -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=120)
        await smtp.connect()
        sent = 0
        for i in counter:
            await smtp.sendmail(FROM, [rcpt(i, domains)], mime(i, domains))
            sent += 1
            if sent % 500 == 0:  # stay under per-connection limits (Postfix: 100 by default?)
                await smtp.quit()
                smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=120)
                await smtp.connect()
        await smtp.quit()

    await asyncio.gather(*(worker() for _ in range(clients)))
    return {}


def _count_client(cpu: dict[str, float], client: dict[str, float]) -> None:
    """With smtp-source submitting, this process only waits: the client's CPU is its own."""
    if client:
        del cpu["submitting client (this process)"]
        cpu.update(client)


async def _smtp_source(port: int, n: int, clients: int, work: Path) -> float:
    """Postfix's C client: the same 2 KB message (-F, its lines end in CRLF on the wire) to
    N distinct recipients (-N numbers them), over `clients` connections kept open (-d).
    Returns its CPU seconds."""
    message = work / "smtp-source.eml"
    message.write_bytes(mime(0, 1).replace(b"\r\n", b"\n"))
    argv = ["smtp-source", "-s", str(clients), "-m", str(n), "-d", "-N", "-M", "bench.test"]
    argv += ["-f", FROM, "-t", rcpt(0, 1), "-F", str(message), f"127.0.0.1:{port}"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)

    def reap() -> float:
        # (if the run is cancelled meanwhile, the thread still reaps it once it is killed)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            raise RuntimeError(f"smtp-source exited with {proc.returncode}")
        return usage.ru_utime + usage.ru_stime

    try:
        return await asyncio.to_thread(reap)
    except BaseException:
        proc.kill()
        raise


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / os.sysconf(
        "SC_CLK_TCK"
    )


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores, /proc/stat): a run whose own
    processes leave the cores idle shows whether something else held them."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    """A live process's peak resident memory (VmHWM), MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def tree_cpu(root_pids: list[int]) -> float:
    """CPU of processes and their (waited-for and live) children."""
    total = 0.0
    for pid in root_pids:
        total += cpu_seconds(pid)
        for child in _children(pid):
            total += cpu_seconds(child)
    return total


def bench_cpu(sink: Sink) -> dict[str, float]:
    """CPU of the parts every system shares: this process (the submitting client, and for
    Sluice its gRPC stream) and the sink."""
    return {
        "submitting client (this process)": time.process_time(),
        "smtp-sink": cpu_seconds(sink.proc.pid),
    }


def _since(now: dict[str, float], then: dict[str, float]) -> dict[str, float]:
    return {k: v - then[k] for k, v in now.items()}


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*") if Path(f"/proc/{pid}").exists() else []:
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for k in kids:
            out.append(int(k))
            out.extend(_children(int(k)))
    return out


# -- Postfix ---------------------------------------------------------------------------------


async def run_postfix(n: int, clients: int, domains: int, submitter: str, work: Path) -> Result:
    sink = Sink(work)
    await sink.wait_ready()
    conf = work / "postfix"
    shutil.rmtree(conf, ignore_errors=True)
    conf.mkdir(parents=True)
    port = free_port()
    (conf / "main.cf").write_text(
        f"""compatibility_level = 3.6
queue_directory = {conf}/queue
data_directory = {conf}/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = bench.localhost
mydestination =
local_recipient_maps =
relayhost = [127.0.0.1]:{sink.port}
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
maillog_file = {conf}/maillog
maillog_file_prefixes = {conf}
smtp_tls_security_level = none
smtpd_tls_security_level = none
"""
    )
    master = Path("/etc/postfix/master.cf").read_text()
    master = re.sub(
        r"(?m)^smtp\s+inet\s.*$", f"127.0.0.1:{port} inet n - n - - smtpd", master, count=1
    )
    master = re.sub(r"(?m)^(\S+\s+\S+\s+\S+\s+\S+\s+)y(\s)", r"\1n\2", master)  # no chroot
    (conf / "master.cf").write_text(master)
    (conf / "queue").mkdir()
    (conf / "data").mkdir()
    shutil.chown(conf / "data", "postfix")
    _allow_alternate_config(conf)
    subprocess.run(["postfix", "-c", str(conf), "check"], check=True)
    subprocess.run(["postfix", "-c", str(conf), "start"], check=True, capture_output=True)
    try:
        for _ in range(100):
            if port_open("127.0.0.1", port):
                break
            await asyncio.sleep(0.1)
        master_pid = int((conf / "queue" / "pid" / "master.pid").read_text().split()[0])
        cpu0, shared0 = tree_cpu([master_pid]), bench_cpu(sink)
        busy0 = machine_busy_seconds()
        start = time.monotonic()
        client = await smtp_submit(port, n, clients, domains, submitter, work)
        submitted = time.monotonic() - start
        arrived, seconds = await wait_arrivals(sink, n, start, 1800)
        cpu = {"postfix (all processes)": tree_cpu([master_pid]) - cpu0}
        cpu.update(_since(bench_cpu(sink), shared0))
        _count_client(cpu, client)
        busy = machine_busy_seconds() - busy0
    finally:
        subprocess.run(["postfix", "-c", str(conf), "stop"], capture_output=True)
        sink.stop()
    return Result("Postfix relay", "no DKIM", n, arrived, seconds, submitted, cpu, machine=busy)


def _allow_alternate_config(conf: Path) -> None:
    """`postfix -c DIR` needs DIR in the default instance's alternate_config_directories."""
    current = subprocess.run(
        ["postconf", "-h", "alternate_config_directories"], capture_output=True, text=True
    ).stdout.strip()
    if str(conf) not in current.split():
        value = f"{current} {conf}".strip()
        subprocess.run(["postconf", "-e", f"alternate_config_directories = {value}"], check=True)


# -- Haraka ----------------------------------------------------------------------------------


def haraka_bin() -> str:
    found = os.environ.get("HARAKA") or shutil.which("haraka")
    if found:
        return found
    default = Path("/opt/haraka/node_modules/.bin/haraka")
    if default.exists():
        return str(default)
    raise SystemExit("Haraka not found: npm install --prefix /opt/haraka Haraka, or set HARAKA")


async def run_haraka(n: int, clients: int, domains: int, submitter: str, work: Path) -> Result:
    sink = Sink(work)
    await sink.wait_ready()
    inst = work / "haraka"
    shutil.rmtree(inst, ignore_errors=True)
    subprocess.run([haraka_bin(), "-i", str(inst)], check=True, capture_output=True)
    port = free_port()
    cfg = inst / "config"
    nodes = os.cpu_count() or 1
    (cfg / "smtp.ini").write_text(
        f"listen=127.0.0.1:{port}\nnodes={nodes}\n\n[headers]\nmax_lines=1000\n"
    )
    (cfg / "plugins").write_text("relay\nqueue/smtp_forward\n")
    (cfg / "relay.ini").write_text("[relay]\nacl=true\nforce_routing=false\n")
    (cfg / "relay_acl_allow").write_text("127.0.0.0/8\n")
    (cfg / "smtp_forward.ini").write_text(
        # enable_outbound=true: relayed mail is forwarded to the sink too, not sent to an MX.
        f"enable_outbound=true\nhost=127.0.0.1\nport={sink.port}\nenable_tls=false\n"
        "auth_type=\nmax_connections=100\n"
    )
    (cfg / "log.ini").write_text("[main]\nlevel=warn\n")
    (cfg / "me").write_text("bench.localhost\n")
    proc = subprocess.Popen(
        [haraka_bin(), "-c", str(inst)],
        stdout=subprocess.DEVNULL,
        stderr=open(work / "haraka.log", "wb"),
    )
    try:
        for _ in range(200):
            if port_open("127.0.0.1", port):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # the cluster's workers
        cpu0, shared0 = tree_cpu([proc.pid]), bench_cpu(sink)
        busy0 = machine_busy_seconds()
        start = time.monotonic()
        client = await smtp_submit(port, n, clients, domains, submitter, work)
        submitted = time.monotonic() - start
        arrived, seconds = await wait_arrivals(sink, n, start, 1800)
        cpu = {f"haraka ({nodes} workers)": tree_cpu([proc.pid]) - cpu0}
        cpu.update(_since(bench_cpu(sink), shared0))
        _count_client(cpu, client)
        busy = machine_busy_seconds() - busy0
    finally:
        proc.terminate()
        proc.wait()
        sink.stop()
    return Result("Haraka relay", "no DKIM", n, arrived, seconds, submitted, cpu, machine=busy)


# -- Sluice ----------------------------------------------------------------------------------


def _dkim_key() -> str:
    return subprocess.run(
        ["openssl", "genrsa", "2048"], capture_output=True, text=True, check=True
    ).stdout


async def run_sluice(
    n: int,
    domains: int,
    deliverers: int,
    dkim: bool,
    webhooks: bool,
    work: Path,
    sync_always: bool = False,
) -> Result:
    sink = Sink(work)
    await sink.wait_ready()
    srv, store_dir = start_nats(sync_always)
    shaping = work / "shaping.toml"
    shaping.write_text("[default]\nmax_connections = 20\n")
    grpc_addr, sched = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = dict(
        os.environ,
        SLUICE_NATS__URL=srv.url,
        SLUICE_INGEST__HTTP_LISTEN=f"127.0.0.1:{free_port()}",
        SLUICE_INGEST__GRPC_LISTEN=grpc_addr,
        SLUICE_SCHEDULER__LISTEN=sched,
        SLUICE_SCHEDULER__SHAPING=str(shaping),
        SLUICE_DELIVERER__SCHEDULER=sched,
        SLUICE_DNS__ROUTES=f"*=127.0.0.1:{sink.port}",
        SLUICE_WEBHOOKS__ALLOW_PRIVATE_TARGETS="true",
    )
    cfg = config_mod.load(None, environ=env)
    nc = await connect(cfg, "bench")
    await ensure_layout(nc.jetstream(), cfg)
    tenants = TenantStore(nc.jetstream())
    tenant = tenant_pb2.Tenant(
        tenant_id="bench", created_at=now_ts(), allowed_from_domains=["bench.test"]
    )
    hook_proc = None
    if dkim:
        tenant.dkim_keys.add(domain="bench.test", selector="s1", private_key_pem=_dkim_key())
    if webhooks:
        hook_port = free_port()
        hook_proc = subprocess.Popen(
            [sys.executable, "-m", "bench.compare", "--hook-receiver", str(hook_port)]
        )
        tenant.webhooks.add(
            id="h1",
            url=f"http://127.0.0.1:{hook_port}/hook",
            secrets=["whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
        )
    await tenants.put_tenant(tenant)
    key, _ = await tenants.create_key("bench")
    await nc.close()
    names = ["ingest", "expander", "scheduler", *["deliverer"] * deliverers]
    if webhooks:
        names.append("webhooks")
    level = os.environ.get("BENCH_LOG_LEVEL", "WARNING")
    procs = [
        subprocess.Popen([sys.executable, "-m", "sluice.cli", "--log-level", level, name], env=env)
        for name in names
    ]
    try:
        for _ in range(200):
            if port_open("127.0.0.1", int(grpc_addr.rsplit(":", 1)[1])):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(2.0)  # deliverers ask for leases
        cpu0 = {p.pid: cpu_seconds(p.pid) for p in procs}
        nats_cpu0 = cpu_seconds(srv.proc.pid) if srv.proc else 0.0
        shared0 = bench_cpu(sink)
        busy0 = machine_busy_seconds()
        start = time.monotonic()
        async with AsyncClient(grpc_addr, key) as client, client.stream(window=4000) as stream:
            futures = [
                await stream.send(
                    from_=FROM, to=[rcpt(i, domains)], subject=f"Bench {i}", text=BODY
                )
                for i in range(n)
            ]
            results = await asyncio.gather(*futures)
        submitted = time.monotonic() - start
        refused = [r for r in results if r.HasField("error")]
        if refused:
            print(f"sluice: {len(refused)} refused, first: {refused[0].error}", file=sys.stderr)
        arrived, seconds = await wait_arrivals(sink, n, start, 1800)
        cpu = {
            f"{name} #{i}": cpu_seconds(p.pid) - cpu0[p.pid]
            for i, (name, p) in enumerate(zip(names, procs, strict=True))
        }
        cpu["nats-server"] = (cpu_seconds(srv.proc.pid) if srv.proc else 0.0) - nats_cpu0
        cpu.update(_since(bench_cpu(sink), shared0))
        busy = machine_busy_seconds() - busy0
        rss = {
            f"{name} #{i}": peak_rss_mib(p.pid)
            for i, (name, p) in enumerate(zip(names, procs, strict=True))
        }
        rss["nats-server"] = peak_rss_mib(srv.proc.pid) if srv.proc else 0.0
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        if hook_proc is not None:
            hook_proc.terminate()
            hook_proc.wait()
        srv.stop()
        store_dir.cleanup()
        sink.stop()
    features = ", ".join(
        [
            "DKIM on" if dkim else "DKIM off",
            "webhooks on" if webhooks else "webhooks off",
            "tracing off",
            *(["sync always"] if sync_always else []),
        ]
    )
    return Result(
        f"Sluice ({deliverers} deliverers)",
        features,
        n,
        arrived,
        seconds,
        submitted,
        cpu,
        rss,
        machine=busy,
    )


def hook_receiver(port: int) -> None:
    """A minimal webhook receiver for --webhooks (answers 204, counts nothing)."""
    from aiohttp import web

    async def ok(_: web.Request) -> web.Response:
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", ok)
    web.run_app(app, host="127.0.0.1", port=port, print=None)


def report(results: list[Result]) -> None:
    print(machine())
    base = next((r for r in results if r.system.startswith("Postfix")), None)
    print(
        f"{'system':26} {'features':36} {'arrived':>9} {'seconds':>8} {'msgs/s':>8} "
        f"{'vs Postfix':>10}"
    )
    for r in results:
        ratio = f"{r.rate / base.rate:.2f}x" if base and base.rate else "-"
        print(
            f"{r.system:26} {r.features:36} {r.arrived:>5}/{r.n:<5} {r.seconds:8.1f} "
            f"{r.rate:8.0f} {ratio:>10}"
        )
        print(f"    submission took {r.submit_seconds:.1f} s; CPU during the run:")
        for name, sec in r.cpu.items():
            peak = f", peak RSS {r.rss[name]:.0f} MiB" if r.rss and name in r.rss else ""
            print(f"      {name:28} {sec:7.1f} s = {sec / max(r.n, 1) * 1e3:.2f} ms/msg{peak}")
        total = sum(r.cpu.values())
        cores = os.cpu_count() or 1
        print(
            f"      {'all of the above':28} {total:7.1f} s = {total / max(r.n, 1) * 1e3:.2f} ms/msg"
            f" ({total / max(r.seconds * cores, 1e-9):.0%} of {cores} cores)"
        )
        if r.machine is not None:
            print(
                f"      {'the whole machine busy':28} {r.machine:7.1f} s"
                f" ({r.machine - total:+.1f} s beside the above)"
            )
        if r.arrived != r.n:
            print(f"    ARRIVALS {r.arrived} != N {r.n}: this run does not count")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--systems", default="sluice,postfix,haraka")
    ap.add_argument("--dkim", choices=["both", "on", "off"], default="both")
    ap.add_argument("--deliverers", type=int, default=2)
    ap.add_argument("--domains", type=int, default=10)
    ap.add_argument(
        "--clients",
        type=int,
        default=None,
        help="SMTP submission connections (default: 8 for Postfix, 256 for Haraka)",
    )
    ap.add_argument(
        "--submitter",
        choices=["smtp-source", "aiosmtplib"],
        default="smtp-source",
        help="the SMTP client that submits to Postfix and Haraka (default: Postfix's smtp-source)",
    )
    ap.add_argument(
        "--sync",
        choices=["interval", "always"],
        default="interval",
        help="nats-server's sync_interval for Sluice: its default (2 min), or always (every "
        "write flushed before it is acknowledged, as Postfix fsyncs each queue file)",
    )
    ap.add_argument("--webhooks", action="store_true")
    ap.add_argument("--hook-receiver", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=1, help="run the systems this many times")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sluice-compare-"))
    work.chmod(0o755)  # Postfix's and smtp-sink's users work in it
    rounds: list[list[Result]] = []
    for i in range(args.rounds):
        results: list[Result] = []
        for system in args.systems.split(","):
            if system == "sluice":
                for dkim in {"both": [False, True], "on": [True], "off": [False]}[args.dkim]:
                    results.append(
                        await run_sluice(
                            args.messages,
                            args.domains,
                            args.deliverers,
                            dkim,
                            args.webhooks,
                            work,
                            args.sync == "always",
                        )
                    )
            elif system == "postfix":
                clients = 8 if args.clients is None else args.clients
                results.append(
                    await run_postfix(args.messages, clients, args.domains, args.submitter, work)
                )
            elif system == "haraka":
                clients = 256 if args.clients is None else args.clients
                results.append(
                    await run_haraka(args.messages, clients, args.domains, args.submitter, work)
                )
            else:
                raise SystemExit(f"unknown system {system!r}")
        if args.rounds > 1:
            print(f"--- round {i + 1} of {args.rounds}")
        report(results)
        rounds.append(results)
    if args.rounds > 1:
        summarize(rounds)


def summarize(rounds: list[list[Result]]) -> None:
    """Each system's rate against its own round's Postfix, every round, and the median."""
    print(f"--- {len(rounds)} rounds, each system against the Postfix run of its round")
    ratios: dict[str, list[float]] = {}
    for results in rounds:
        base = next((r for r in results if r.system.startswith("Postfix")), None)
        for r in results:
            if base is None or r is base or base.arrived != base.n or r.arrived != r.n:
                continue
            ratios.setdefault(f"{r.system}, {r.features}", []).append(r.rate / base.rate)
    for name, values in ratios.items():
        listed = " ".join(f"{v:.2f}x" for v in values)
        print(
            f"{name}: {listed} (median {statistics.median(values):.2f}x, lowest {min(values):.2f}x)"
        )


if __name__ == "__main__":
    if "--hook-receiver" in sys.argv:  # the --webhooks receiver, a process of its own
        hook_receiver(int(sys.argv[sys.argv.index("--hook-receiver") + 1]))
    else:
        asyncio.run(main())
