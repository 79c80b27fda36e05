"""The local nats-server launcher: the Go runtime's GOMAXPROCS it hands the server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sluice.natsserver import NatsServer, embedded_gomaxprocs


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
