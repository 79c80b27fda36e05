"""Shared helpers for benchmarks: the machine description and a throwaway JetStream."""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
from pathlib import Path

from sluice.natsserver import NatsServer, nats_server_binary


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
        f"Python {platform.python_version()}, {nats.strip() or 'nats-server ?'}"
    )


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (not its children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_nats() -> tuple[NatsServer, tempfile.TemporaryDirectory[str]]:
    tmp = tempfile.TemporaryDirectory(prefix="sluice-bench-")
    srv = NatsServer(Path(tmp.name) / "js", log_file=Path(tmp.name) / "nats.log")
    srv.start()
    return srv, tmp
