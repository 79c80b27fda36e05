"""Shared helpers for benchmarks: the machine description and a throwaway JetStream."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp

from sluice.natsserver import (
    NatsServer,
    embedded_gomaxprocs,
    nats_server_binary,
    server_gomaxprocs,
)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    nats = subprocess.run(
        [nats_server_binary(), "--version"], capture_output=True, text=True
    ).stdout
    return (
        f"{platform.node()}: {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, "
        f"Python {platform.python_version()} ({interpreter()}), {nats.strip() or 'nats-server ?'} "
        f"(GOMAXPROCS {server_gomaxprocs(embedded_gomaxprocs())}), "
        f"nats store in {tempfile.gettempdir()}: {filesystem(Path(tempfile.gettempdir()))}"
    )


def filesystem(path: Path) -> str:
    """The file system `path` is on (from /proc/self/mounts), and for ext4 whether it has a
    journal. Without one, ext4 checks every inode it allocates against those freed in the
    last minutes and skips them (fs/ext4/ialloc.c, find_inode_bit), so nats-server's
    consumer state files, written to a new file and renamed several times a second per
    active consumer, cost more the more consumers are active: a fifth to a quarter of
    nats-server's CPU in bench.shaping's long tail on such a disk (docs/scheduling.md,
    Measured). Set TMPDIR to put the benchmarks' store elsewhere."""
    real = os.path.realpath(path)
    best: tuple[str, str, str] | None = None
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return "file system unknown"
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        dev, mount, fstype = fields[0], fields[1].replace("\\040", " "), fields[2]
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and (best is None or len(mount) >= len(best[1])):
            best = (dev, mount, fstype)
    if best is None:
        return "file system unknown"
    dev, _, fstype = best
    if fstype != "ext4":
        return f"{fstype} on {dev}"
    journal = any(Path("/proc/fs/jbd2").glob(f"{Path(dev).name}-*"))
    return f"ext4 on {dev}, {'with a journal' if journal else 'no journal'}"


def interpreter() -> str:
    """Which Python build runs the benchmark (and the Sluice processes it starts): its
    executable, and whether the interpreter is in a shared libpython. How it was built
    matters: pyenv's default build (no PGO or LTO, a shared libpython) ran bench.compare's
    Sluice 13 % slower than Debian's python3.11 (docs/performance.md)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    linked = "shared libpython" if "libpython" in maps else "libpython linked in"
    return f"{os.path.realpath(sys.executable)}, {linked}"


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (not its children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_nats(
    sync_always: bool = False, monitor_port: int | None = None
) -> tuple[NatsServer, tempfile.TemporaryDirectory[str]]:
    """A nats-server with file storage in a temporary directory; `sync_always`: every write
    flushed to disk before it is acknowledged (`sync_interval: always`); `monitor_port`:
    its HTTP monitoring on that loopback port (read by `nats_traffic`)."""
    tmp = tempfile.TemporaryDirectory(prefix="sluice-bench-")
    root = Path(tmp.name)
    srv = NatsServer(
        root / "js",
        log_file=root / "nats.log",
        gomaxprocs=embedded_gomaxprocs(),
        sync_always=sync_always,
        config=f'http: "127.0.0.1:{monitor_port}"\n' if monitor_port else "",
    )
    srv.start()
    return srv, tmp


async def nats_traffic(monitor_port: int) -> dict[str, tuple[int, int]]:
    """Messages each connected client has published to nats-server and received from it so
    far, summed by connection name (from the monitoring endpoint /connz)."""
    url = f"http://127.0.0.1:{monitor_port}/connz?limit=4096"
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        data = await r.json()
    out: dict[str, tuple[int, int]] = {}
    for conn in data.get("connections") or []:
        name = conn.get("name") or "?"
        sent, got = out.get(name, (0, 0))
        out[name] = (sent + conn["in_msgs"], got + conn["out_msgs"])
    return out
