from __future__ import annotations

from sluice.config import Config
from sluice.retry import BUSY_DELAY_CAP, FAST_HANDBACKS, busy_delay, next_delay

LADDER = [60.0, 300.0, 900.0]


def test_step_follows_age_not_attempts() -> None:
    assert next_delay(0, LADDER) == 60
    assert next_delay(59, LADDER) == 60
    assert next_delay(61, LADDER) == 300
    assert next_delay(361, LADDER) == 900
    # Past the ladder: the last step repeats.
    assert next_delay(10_000, LADDER) == 900


def test_jitter_only_lengthens_and_is_bounded() -> None:
    delays = {next_delay(0, LADDER, jitter=0.1) for _ in range(200)}
    assert min(delays) >= 60 and max(delays) <= 66
    assert len(delays) > 1


def test_busy_handbacks_never_spend_max_deliver_within_the_horizon() -> None:
    """A pointer handed back again and again because its site stays at its limit must not
    reach MaxDeliver (and a dead letter) before the longest horizon ends."""
    cfg = Config()
    horizon = max(cfg.horizon(t) for t in ("critical", "transactional", "bulk"))
    waited, deliveries = 0.0, 0
    while waited < horizon:
        deliveries += 1
        waited += busy_delay(deliveries, jitter=0.0)
    assert deliveries < cfg.retry.max_deliver, deliveries
    # Short busy spells cost about a second a time, and the wait is bounded.
    assert busy_delay(1, jitter=0.0) == busy_delay(FAST_HANDBACKS, jitter=0.0) == 1.0
    assert busy_delay(FAST_HANDBACKS + 1, jitter=0.0) == 2.0
    assert busy_delay(10_000, jitter=0.0) == BUSY_DELAY_CAP
    assert 1.0 <= busy_delay(1) <= 1.5
