"""The local nats-server launcher: the Go runtime's GOMAXPROCS it hands the server, and
`sync_interval: always` when asked."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

import pytest

from sluice.natsserver import NatsServer, embedded_gomaxprocs, free_port, port_open


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


@pytest.mark.parametrize(("cores", "expected"), [(1, 1), (2, 1), (3, 1), (8, 4)])
def test_embedded_gomaxprocs_is_half_the_cores_at_least_one(
    monkeypatch: pytest.MonkeyPatch, cores: int, expected: int
) -> None:
    """Half the cores this process may run on (its affinity, as Go's own default counts)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(cores)))
    assert embedded_gomaxprocs() == expected


@pytest.mark.parametrize(
    ("given", "outside", "expected"),
    [(1, None, "1"), (None, None, None), (1, "2", "2")],
    ids=["given", "go-default", "environment-wins"],
)
def test_the_server_runs_with_the_gomaxprocs_given(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    given: int | None,
    outside: str | None,
    expected: str | None,
) -> None:
    if outside is None:
        monkeypatch.delenv("GOMAXPROCS", raising=False)
    else:
        monkeypatch.setenv("GOMAXPROCS", outside)
    srv = NatsServer(tmp_path / "js", log_file=tmp_path / "nats.log", gomaxprocs=given)
    srv.start()
    try:
        assert srv.proc is not None
        assert _environ(srv.proc.pid).get("GOMAXPROCS") == expected
    finally:
        srv.stop()


@pytest.mark.parametrize("sync_always", [True, False], ids=["always", "default"])
def test_sync_always_reaches_the_servers_config(tmp_path: Path, sync_always: bool) -> None:
    """The server runs with the store directory given, and with `sync_interval: always` when
    asked (read back from its own /varz); it once refused to start with it, the directory
    named twice."""
    monitor = free_port()
    srv = NatsServer(
        tmp_path / "js",
        log_file=tmp_path / "nats.log",
        sync_always=sync_always,
        config=f'http: "127.0.0.1:{monitor}"',
    )
    srv.start()
    try:
        for _ in range(100):
            if port_open("127.0.0.1", monitor):
                break
            time.sleep(0.05)
        with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/varz", timeout=5) as resp:
            config = json.load(resp)["jetstream"]["config"]
        assert config.get("sync_always", False) is sync_always
        assert config["store_dir"] == str(tmp_path / "js" / "jetstream")
    finally:
        srv.stop()
