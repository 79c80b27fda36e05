"""The deliverer's outcome reports (Deliverer._flush_outcomes, a unit below the scheduler
client): counts per lease and kind to a scheduler that reads them, an Outcome per attempt
to one that does not (an older scheduler during a rolling upgrade); throttled outcomes one
by one with their reply either way."""

from __future__ import annotations

import pytest

from deliverer.worker import Deliverer
from sluice.v1 import messages_pb2, scheduler_pb2

DELIVERED = scheduler_pb2.OUTCOME_KIND_DELIVERED
BOUNCED = scheduler_pb2.OUTCOME_KIND_BOUNCED
THROTTLED = scheduler_pb2.OUTCOME_KIND_THROTTLED


class _Scheduler:
    def __init__(self, outcome_counts: bool) -> None:
        self.outcome_counts = outcome_counts
        self.reports: list[scheduler_pb2.ReportOutcomesRequest] = []

    async def ReportOutcomes(  # noqa: N802 - as on the client
        self, request: scheduler_pb2.ReportOutcomesRequest, timeout: float | None = None
    ) -> scheduler_pb2.ReportOutcomesResponse:
        self.reports.append(request)
        return scheduler_pb2.ReportOutcomesResponse()


@pytest.mark.parametrize("counts", [True, False])
async def test_outcomes_are_reported_counted_or_one_by_one(counts: bool) -> None:
    scheduler = _Scheduler(counts)
    deliverer = Deliverer.__new__(Deliverer)  # (only the reporting state is needed)
    deliverer.deliverer_id = "d1"
    deliverer._scheduler = scheduler  # type: ignore[assignment]
    deliverer._tallies = {("lease_a", "site_a", DELIVERED): 3, ("lease_a", "site_a", BOUNCED): 1}
    throttle = scheduler_pb2.Outcome(
        lease_id="lease_a",
        site_id="site_a",
        domain="a.test",
        kind=THROTTLED,
        reply=messages_pb2.SmtpReply(code=421, text="rate limited"),
    )
    deliverer._throttles = [throttle]
    await deliverer._flush_outcomes()
    (report,) = scheduler.reports
    assert report.deliverer_id == "d1"
    sent = list(report.outcomes)
    assert sent[0] == throttle
    tally = [(o.site_id, o.kind, o.count) for o in sent[1:]]
    if counts:
        assert tally == [("site_a", DELIVERED, 3), ("site_a", BOUNCED, 1)]
    else:
        assert tally == [("site_a", DELIVERED, 0)] * 3 + [("site_a", BOUNCED, 0)]
    assert not deliverer._tallies and not deliverer._throttles
    await deliverer._flush_outcomes()  # (nothing more to say: no report)
    assert len(scheduler.reports) == 1
