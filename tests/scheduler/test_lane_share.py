"""Hash-bucket lanes are shared evenly between deliverers: the first deliverer to ask may take
every lane while it is alone, but once a second one asks, the first's next renewal gives back
the lanes beyond its share (as many as the second has room for) and the second gets them. (A
real Scheduler on a real nats-server, with mail pointers stored on eight bucket lanes.)"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from scheduler.service import Scheduler
from sluice import names
from sluice.natsserver import NatsServer
from sluice.v1 import messages_pb2
from tests.conftest import running_scheduler, scheduler_config

LANES = [f"b{i:02d}" for i in range(8)]


@pytest.fixture
async def scheduler(nats_server: NatsServer) -> AsyncIterator[Scheduler]:
    """A started Scheduler, with mail pointers stored on the eight LANES."""
    cfg = scheduler_config(nats_server, scheduler={"lease_ttl": "30s"})
    async with running_scheduler(cfg, start=False) as s:
        for lane in LANES:
            await _fill(s, lane, 1)
        await s.start()
        yield s


async def _fill(scheduler: Scheduler, lane: str, n: int) -> None:
    for _ in range(n):
        await scheduler._js.publish(
            names.mail_subject(messages_pb2.TIER_BULK, lane, "mail_test", "acme"), b"p"
        )


async def test_lanes_are_split_between_deliverers(scheduler: Scheduler) -> None:
    first = await scheduler.acquire("d1", 16)
    assert sorted(ls.lane for ls in first) == LANES, "alone, d1 takes every lane"
    assert await scheduler.acquire("d2", 16) == [], "nothing is free yet"

    # d1's renewal gives back what is beyond its share of 8 lanes between 2 deliverers.
    renewed = await scheduler.renew("d1", [ls.lease_id for ls in first])
    assert len(renewed.leases) == 4 and len(renewed.lost_lease_ids) == 4
    second = await scheduler.acquire("d2", 16)
    kept = {ls.lane for ls in renewed.leases}
    assert {ls.lane for ls in second} == set(LANES) - kept

    # Balanced now: neither gives anything back, and no lane is held twice.
    again = await scheduler.renew("d1", [ls.lease_id for ls in renewed.leases])
    assert len(again.leases) == 4 and not again.lost_lease_ids
    held = [ls.lane for ls in scheduler.leases.all() if ls.kind == "lane"]
    assert sorted(held) == LANES

    # A deliverer that stopped asking (crashed, or busy at its max_leases) no longer
    # counts: d2's lanes go back once d2's leases are gone, and d1 may take them all,
    # rather than half of them staying unleased for d2.
    for ls in second:
        scheduler.leases.release("d2", ls.lease_id)
    scheduler._seen["d2"] = time.monotonic() - 3600
    await scheduler.renew("d2", [])  # renewing (other leases) is not asking for lanes
    regained = await scheduler.acquire("d1", 16)
    assert sorted(ls.lane for ls in [*again.leases, *regained]) == LANES


async def test_a_deliverer_at_its_max_leases_still_gets_its_share_of_lanes(
    scheduler: Scheduler,
) -> None:
    """Lanes take no lease slots: a second deliverer busy with as many sites as it may work
    (it asks for lanes only, max_leases 0) still gets its whole share of the lanes, and the
    first gives back what is beyond its own share."""
    first = await scheduler.acquire("d1", 16)
    assert sorted(ls.lane for ls in first) == LANES
    assert await scheduler.acquire("d2", 0) == []  # (every lane is held)
    renewed = await scheduler.renew("d1", [ls.lease_id for ls in first])
    assert len(renewed.leases) == 4 and len(renewed.lost_lease_ids) == 4
    second = await scheduler.acquire("d2", 0)
    assert len(second) == 4 and all(ls.lane for ls in second)
    again = await scheduler.renew("d1", [ls.lease_id for ls in renewed.leases])
    assert len(again.leases) == 4 and not again.lost_lease_ids


async def test_an_idle_deliverer_shares_the_busiest_lane(scheduler: Scheduler) -> None:
    """Lanes are whole (ten domains fell into five lanes, dealt three and two): a deliverer
    with no lane with mail, while every lane with mail is held, gets a second lease on the
    lane with the most mail, if it has at least _SHARE_LANE messages; not a third holder,
    and not a lane with little mail."""
    from scheduler import service

    busy, busier = LANES[2], LANES[5]
    for lane, n in ((busy, service._SHARE_LANE), (busier, service._SHARE_LANE + 10)):
        await _fill(scheduler, lane, n)
    await scheduler.refresh_backlog()
    first = await scheduler.acquire("d1", 16)
    assert sorted(ls.lane for ls in first) == LANES

    shared = await scheduler.acquire("d2", 16)
    assert [ls.lane for ls in shared] == [busier], "the lane with the most mail"
    assert shared[0].queues, "with the lane's queues"
    # d2 holds a lane with mail now: no second share.
    assert await scheduler.acquire("d2", 16) == []
    # A third deliverer shares the other busy lane, not `busier` a third time.
    assert [ls.lane for ls in await scheduler.acquire("d3", 16)] == [busy]
    assert await scheduler.acquire("d4", 16) == [], "the rest have too little mail"
    holders = [ls.deliverer_id for ls in scheduler.leases.all() if ls.lane == busier]
    assert sorted(holders) == ["d1", "d2"]


async def test_a_shared_lane_does_not_stop_whole_lanes_being_given_back(
    scheduler: Scheduler,
) -> None:
    """At the start of a blast the second deliverer may ask before the first renews, and
    share a lane then; the first still gives back its whole lanes beyond its share (a
    shared lease is not counted as one of the sharer's lanes)."""
    from scheduler import service

    for lane in LANES[:2]:
        await _fill(scheduler, lane, service._SHARE_LANE)
    # Only the two busy lanes have mail now: the others' pointers are taken away.
    for ls in LANES[2:]:
        await scheduler._js.purge_stream(
            names.MAIL_STREAM,
            subject=names.mail_subject(messages_pb2.TIER_BULK, ls, "mail_test", "acme"),
        )
    await scheduler.refresh_backlog()
    first = await scheduler.acquire("d1", 16)
    assert sorted(ls.lane for ls in first) == LANES[:2]
    shared = await scheduler.acquire("d2", 16)
    assert len(shared) == 1 and shared[0].lane in LANES[:2]

    renewed = await scheduler.renew("d1", [ls.lease_id for ls in first])
    assert len(renewed.leases) == 1 and len(renewed.lost_lease_ids) == 1
    await scheduler.acquire("d2", 16)
    held = {
        d: {ls.lane for ls in scheduler.leases.held_by(d) if ls.kind == "lane"}
        for d in ("d1", "d2")
    }
    assert len(held["d1"]) == 1 and held["d1"] | held["d2"] == set(LANES[:2])


async def test_a_lane_is_not_shared_again_at_once(scheduler: Scheduler) -> None:
    """A shared lease that ended (its lane's mail was in the other holder's hands, say)
    is not granted again for _SHARE_COOLDOWN, even once the lane's own cooldown is over."""
    from scheduler import service

    await _fill(scheduler, LANES[3], service._SHARE_LANE)
    await scheduler.refresh_backlog()
    assert len(await scheduler.acquire("d1", 16)) == len(LANES)
    shared = await scheduler.acquire("d2", 16)
    assert [ls.lane for ls in shared] == [LANES[3]]
    scheduler.release("d2", [shared[0].lease_id])
    scheduler._cooldown.clear()  # (as if backlog_interval had passed)
    assert await scheduler.acquire("d2", 16) == []
    scheduler._share_cooldown.clear()  # (as if _SHARE_COOLDOWN had passed)
    assert [ls.lane for ls in await scheduler.acquire("d2", 16)] == [LANES[3]]
