from __future__ import annotations

from sluice.retry import next_delay

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
