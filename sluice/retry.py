"""The retry ladder: the next delay comes from the message's age, not its delivery count.

JetStream's num_delivered also grows on handbacks, lease expiry and crashes; counting from
acceptance keeps those from using up the ladder. With ladder [1m, 5m, 15m] a message first
tried at age 0 waits 1m, at age 1m waits 5m, at age 6m waits 15m, then every 15m.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

__all__ = ["next_delay"]


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
