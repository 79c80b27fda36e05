"""Which lane a pointer goes to: its domain's own queues, or a hash bucket.

A domain with many recipients in one job (`[expander] dedicated_threshold`) gets dedicated
queues (lane "d") and is registered in KV `sluice_lanes` (value: the unix time the entry
lapses) so that later jobs to it follow, whatever their size. Every other domain goes to one
of `[expander] buckets` hash-bucket lanes. Consumers are per (tier, lane, tenant) and, in the
dedicated lane, per domain too: their number grows with busy domains and active tenants, not
with the number of domains a blast touches (docs/scheduling.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from nats.js import JetStreamContext

from sluice import names
from sluice.kvmirror import KvMirror
from sluice.nats_layout import kv_put_ttl

__all__ = ["Lanes"]

log = logging.getLogger(__name__)


class Lanes(KvMirror):
    def __init__(self, js: JetStreamContext, buckets: int, ttl: float) -> None:
        super().__init__(js, names.LANES_BUCKET)
        self._buckets = buckets
        self._ttl = ttl

    def _until(self, key: str) -> float:
        """When the domain's dedicated queues lapse (0: it has none)."""
        try:
            return float(self.values.get(key, b"0"))
        except ValueError:
            return 0.0

    def dedicated(self, key: str) -> bool:
        return self._until(key) > time.time()

    def lane(self, key: str, busy: bool = False) -> str:
        if busy or self.dedicated(key):
            return names.DEDICATED_LANE
        return names.bucket_lane(key, self._buckets)

    async def promote(self, keys: Iterable[str]) -> None:
        """Give these domains dedicated queues from now on (for `ttl`, renewed by use)."""
        now = time.time()
        for key in keys:
            if self._until(key) > now + self._ttl / 2:
                continue  # registered recently enough
            value = f"{now + self._ttl:.0f}".encode()
            self.values[key] = value  # at once, before the watch brings it back
            await kv_put_ttl(self._js, names.LANES_BUCKET, key, value, self._ttl)
            log.info("domain %s has dedicated queues", names.key_domain(key))
