"""The retry ladder: the next delay comes from the message's age, not its delivery count.

JetStream's num_delivered also grows on handbacks, lease expiry and crashes; counting from
acceptance keeps those from using up the ladder. With ladder [1m, 5m, 15m] a message first
tried at age 0 waits 1m, at age 1m waits 5m, at age 6m waits 15m, then every 15m.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

__all__ = ["BUSY_DELAY_CAP", "FAST_HANDBACKS", "busy_delay", "next_delay"]


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
# Handbacks that wait only about a second (contention for a site is usually short).
FAST_HANDBACKS = 20


def busy_delay(num_delivered: int, jitter: float = 0.5) -> float:
    """Seconds to hand a pointer back for when its site has no free connection.

    Each handback counts as a JetStream delivery. The first FAST_HANDBACKS wait about a
    second (a site is rarely busy for long); after that the wait doubles (2 s, 4 s, ... up to
    BUSY_DELAY_CAP), so a site that stays busy for days uses up fewer than 180 deliveries in
    72 hours, inside `[retry] max_deliver` (200).
    """
    over = max(num_delivered, 1) - FAST_HANDBACKS
    base = 1.0 if over <= 0 else min(BUSY_DELAY_CAP, 2.0 ** min(over, 16))
    return base * (1.0 + random.uniform(0.0, jitter))
