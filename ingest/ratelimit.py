"""Per-tenant request rate limits: a token bucket per tenant, in this ingest process."""

from __future__ import annotations

import time

__all__ = ["RateLimiter"]


class RateLimiter:
    """`rate` requests per second with a burst of one second's worth."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}

    def acquire(self, tenant_id: str, rate: float, cost: float = 1.0) -> float:
        """0 if allowed now (tokens taken), else seconds until it would be."""
        if rate <= 0:
            return 0.0
        now = time.monotonic()
        tokens, at = self._buckets.get(tenant_id, (rate, now))
        tokens = min(rate, tokens + (now - at) * rate)
        if tokens >= cost:
            self._buckets[tenant_id] = (tokens - cost, now)
            return 0.0
        self._buckets[tenant_id] = (tokens, now)
        return (cost - tokens) / rate
