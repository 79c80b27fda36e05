"""deliverer.background.Background: work waits for room while `limit` tasks run, each task
that ends lets one waiter in (longest waiting first), and a drain waits for all of it.
(A unit below the network seams: plain asyncio tasks.)"""

from __future__ import annotations

import asyncio

import pytest

from deliverer.background import Background


async def _until(gate: asyncio.Event, log: list[str], name: str) -> None:
    await gate.wait()
    log.append(name)


async def test_work_waits_for_room_and_waiters_go_in_turn() -> None:
    bg = Background(2, "test")
    gates = [asyncio.Event() for _ in range(4)]
    ended: list[str] = []
    await bg.run(_until(gates[0], ended, "a"))
    await bg.run(_until(gates[1], ended, "b"))
    started: list[str] = []

    async def submit(i: int, name: str) -> None:
        await bg.run(_until(gates[i], ended, name))
        started.append(name)

    c = asyncio.create_task(submit(2, "c"))
    await asyncio.sleep(0)
    d = asyncio.create_task(submit(3, "d"))
    await asyncio.sleep(0.01)
    assert started == [] and len(bg) == 2  # (both wait: two are running)
    gates[1].set()
    await asyncio.sleep(0.01)
    assert started == ["c"] and len(bg) == 2  # (one ended: the longest waiting went in)
    gates[0].set()
    await asyncio.gather(c, d)
    assert started == ["c", "d"]
    gates[2].set()
    gates[3].set()
    assert await bg.join(1.0)
    assert sorted(ended) == ["a", "b", "c", "d"] and len(bg) == 0


async def test_a_waiter_cancelled_after_being_let_in_passes_the_room_on() -> None:
    bg = Background(1, "test")
    gate = asyncio.Event()
    ended: list[str] = []
    await bg.run(_until(gate, ended, "a"))
    first = asyncio.create_task(bg.run(_until(asyncio.Event(), ended, "never")))
    await asyncio.sleep(0)
    second_gate = asyncio.Event()
    second = asyncio.create_task(bg.run(_until(second_gate, ended, "b")))
    await asyncio.sleep(0.01)
    gate.set()
    # "a" ends and lets `first` in (the room is its: nothing runs); `first` is cancelled
    # before it runs again.
    for _ in range(100):
        if not len(bg):
            break
        await asyncio.sleep(0)
    assert ended == ["a"] and not len(bg)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 1.0)  # (it got the room)
    second_gate.set()
    assert await bg.join(1.0)
    assert ended == ["a", "b"]


async def test_join_gives_up_at_its_deadline_and_failures_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bg = Background(4, "settling")
    stuck = asyncio.Event()

    async def fail() -> None:
        raise RuntimeError("boom")

    bg.start(fail())
    bg.start(stuck.wait())
    assert not await bg.join(0.05)
    assert len(bg) == 1
    assert "settling failed (the pointer comes back): RuntimeError('boom')" in caplog.text
    stuck.set()
    assert await bg.join(1.0)


async def test_a_newcomer_does_not_take_the_room_kept_for_a_waiter() -> None:
    """The room a task leaves goes to the caller waiting longest, even when another caller
    comes in the same turn of the loop, before the waiter has run again."""
    bg = Background(1, "test")
    gate = asyncio.Event()
    hold = asyncio.Event()
    started: list[str] = []

    async def work(name: str, until: asyncio.Event) -> None:
        started.append(name)
        await until.wait()

    await bg.run(work("a", gate))
    waiter = asyncio.create_task(bg.run(work("waiter", hold)))
    await asyncio.sleep(0.01)

    async def newcomer() -> None:
        await gate.wait()  # (woken with "a", it comes right after "a" ends)
        await asyncio.sleep(0)
        await bg.run(work("newcomer", hold))

    late = asyncio.create_task(newcomer())
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.wait_for(waiter, 1.0)
    assert started == ["a", "waiter"]
    hold.set()
    await asyncio.wait_for(late, 1.0)
    assert started == ["a", "waiter", "newcomer"]
    assert await bg.join(1.0)
