"""The retry ladder: the next delay comes from the message's age, not its delivery count.

JetStream's num_delivered also grows on handbacks, lease expiry and crashes; counting from
acceptance keeps those from using up the ladder. With ladder [1m, 5m, 15m] a message first
tried at age 0 waits 1m, at age 1m waits 5m, at age 6m waits 15m, then every 15m.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

__all__ = ["BUSY_DELAY_CAP", "busy_delay", "next_delay"]


def next_delay(age: float, ladder: Sequence[float], jitter: float = 0.0) -> float:
    """Seconds until the next attempt for a message `age` seconds old."""
    if not ladder:
        raise ValueError("empty retry ladder")
    elapsed = 0.0
    delay = ladder[-1]
    for step in ladder:
        elapsed += step
        if age < elapsed:
            delay = step
            break
    if jitter:
        delay += delay * random.uniform(0.0, jitter)
    return delay


# Longest wait of a pointer handed back because its site is at its limit.
BUSY_DELAY_CAP = 1800.0


def busy_delay(num_delivered: int, jitter: float = 0.5) -> float:
    """Seconds to hand a pointer back for when its site has no free connection.

    Each handback counts as a JetStream delivery, so the wait doubles with the delivery
    count (1 s, 2 s, 4 s, ... up to BUSY_DELAY_CAP): a site that stays busy for days uses up
    fewer than 160 deliveries in 72 hours, well inside `[retry] max_deliver` (200), and a
    short busy spell still costs only seconds.
    """
    base = min(BUSY_DELAY_CAP, 2.0 ** min(max(num_delivered, 1) - 1, 16))
    return base * (1.0 + random.uniform(0.0, jitter))
