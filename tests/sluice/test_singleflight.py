"""SingleFlight: one call per key at a time (a unit below the NATS seam)."""

from __future__ import annotations

import asyncio

import pytest

from sluice.singleflight import SingleFlight


async def test_callers_that_come_while_a_call_runs_share_it() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    calls: list[str] = []
    release = asyncio.Event()

    async def read(key: str) -> int:
        calls.append(key)
        await release.wait()
        return len(calls)

    waiting = [asyncio.ensure_future(flight.do("a", lambda: read("a"))) for _ in range(20)]
    other = asyncio.ensure_future(flight.do("b", lambda: read("b")))
    await asyncio.sleep(0.01)
    release.set()
    assert await asyncio.gather(*waiting) == [2] * 20
    assert await other == 2
    assert calls == ["a", "b"], "one call per key"
    # Done: the next caller calls again.
    assert await flight.do("a", lambda: read("a")) == 3


async def test_a_cancelled_caller_leaves_the_others_a_call_of_their_own() -> None:
    """The first caller makes the call; cancelled, it takes its call with it, and the
    callers waiting for it make the call again (one of them), rather than fail."""
    flight: SingleFlight[str, str] = SingleFlight()
    release = asyncio.Event()
    calls = 0

    async def read() -> str:
        nonlocal calls
        calls += 1
        await release.wait()
        return "payload"

    first = asyncio.ensure_future(flight.do("k", read))
    others = [asyncio.ensure_future(flight.do("k", read)) for _ in range(3)]
    await asyncio.sleep(0.01)
    assert calls == 1
    first.cancel()
    await asyncio.sleep(0.01)
    release.set()
    assert await asyncio.gather(*others) == ["payload"] * 3
    assert calls == 2, "one more call, for the three"
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_a_cancelled_waiter_does_not_cancel_the_call() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    release = asyncio.Event()

    async def read() -> str:
        await release.wait()
        return "payload"

    first = asyncio.ensure_future(flight.do("k", read))
    second = asyncio.ensure_future(flight.do("k", read))
    await asyncio.sleep(0.01)
    second.cancel()
    release.set()
    assert await first == "payload"
    with pytest.raises(asyncio.CancelledError):
        await second


async def test_a_failure_reaches_every_caller_and_is_not_kept() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    attempts = 0

    async def read() -> str:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0.01)
        if attempts == 1:
            raise LookupError("not there yet")
        return "found"

    results = await asyncio.gather(
        *(flight.do("k", read) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, LookupError) for r in results), results
    assert await flight.do("k", read) == "found"
    assert attempts == 2
