"""The local nats-server launcher: the Go runtime's GOMAXPROCS it hands the server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sluice.natsserver import NatsServer, embedded_gomaxprocs


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def test_embedded_gomaxprocs_is_half_the_cores_at_least_one() -> None:
    assert embedded_gomaxprocs() == max(1, (os.cpu_count() or 2) // 2)


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
