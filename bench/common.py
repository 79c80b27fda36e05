"""Shared helpers for benchmarks: the machine description and a throwaway JetStream."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

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
        f"(GOMAXPROCS {server_gomaxprocs(embedded_gomaxprocs())})"
    )


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


def start_nats(sync_always: bool = False) -> tuple[NatsServer, tempfile.TemporaryDirectory[str]]:
    """A nats-server with file storage in a temporary directory; `sync_always`: every write
    flushed to disk before it is acknowledged (`sync_interval: always`)."""
    tmp = tempfile.TemporaryDirectory(prefix="sluice-bench-")
    root = Path(tmp.name)
    srv = NatsServer(
        root / "js",
        log_file=root / "nats.log",
        gomaxprocs=embedded_gomaxprocs(),
        sync_always=sync_always,
    )
    srv.start()
    return srv, tmp
