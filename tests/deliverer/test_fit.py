"""A site's connection remembers which domains it may carry (Deliverer._fit) for as long as
their MX hosts are cached, 30 s at most, then asks again: mail does not go on to an MX host
the domain no longer names. (A unit with stand-ins for the resolver and the connection.)"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

from deliverer.worker import _SERVES_FOR, Deliverer

# (called on stand-ins for the deliverer and the connection)
_FIT: Any = Deliverer._fit
_REMEMBER: Any = Deliverer._remember_serves


class _Conn:
    def __init__(self) -> None:
        self.serves: dict[str, float] = {}
        self.closed = False

    async def close(self) -> None:
        self.closed = True


def _conn() -> Any:
    return _Conn()


def _worker(ttl_left: float | None, answers: list[bool]) -> Any:
    asked: list[str] = []

    async def serves(conn: _Conn, domain: str) -> bool:
        asked.append(domain)
        return answers.pop(0)

    resolver = SimpleNamespace(
        known_mx=lambda domain: None if ttl_left is None else (["mx.example"], ttl_left)
    )
    worker = SimpleNamespace(_serves=serves, _resolver=resolver, asked=asked)
    worker._remember_serves = lambda conn, domain, now: _REMEMBER(worker, conn, domain, now)
    return worker


async def test_what_a_connection_serves_is_remembered_while_the_mx_is_cached() -> None:
    worker, conn = _worker(ttl_left=5.0, answers=[True, False]), _conn()
    assert await _FIT(worker, conn, "a.example") is conn
    assert await _FIT(worker, conn, "a.example") is conn
    assert worker.asked == ["a.example"], "asked once"
    assert conn.serves["a.example"] - time.monotonic() <= 5.0
    # Once the MX hosts' TTL has run out it asks again; the domain's MX changed meanwhile:
    # the connection is closed and the mail goes through a new one.
    conn.serves["a.example"] = time.monotonic() - 1
    assert await _FIT(worker, conn, "a.example") is None
    assert worker.asked == ["a.example", "a.example"] and conn.closed


async def test_without_a_cached_mx_it_is_remembered_for_at_most_the_bound() -> None:
    worker, conn = _worker(ttl_left=None, answers=[True]), _conn()
    assert await _FIT(worker, conn, "routed.example") is conn
    assert 0 < conn.serves["routed.example"] - time.monotonic() <= _SERVES_FOR
