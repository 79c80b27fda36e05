"""What a deliverer delivered lately, so that a pointer whose acknowledgement was lost (its
consumer's leader on a node that died) is acknowledged again when it comes back, not sent a
second time; and, the same way, what it gave back undelivered lately."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Generic, TypeVar

__all__ = ["Sent"]

T = TypeVar("T")


class Sent(Generic[T]):
    """Delivery ids with what their delivery left to settle again, each kept for `keep`
    seconds, `most` of them at most (the oldest go first)."""

    def __init__(self, keep: float, most: int) -> None:
        self._keep = keep
        self._most = most
        self._ids: OrderedDict[str, tuple[float, T]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, delivery_id: str, what: T) -> None:
        now = time.monotonic()
        ids = self._ids
        ids[delivery_id] = (now, what)
        ids.move_to_end(delivery_id)
        while ids:
            _, (at, _) = next(iter(ids.items()))
            if len(ids) <= self._most and now - at < self._keep:
                break
            ids.popitem(last=False)

    def get(self, delivery_id: str) -> T | None:
        hit = self._ids.get(delivery_id)
        return hit[1] if hit is not None and time.monotonic() - hit[0] < self._keep else None
