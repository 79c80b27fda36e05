"""Adaptive limits per site: throttle replies cut them, sustained success restores them.

Multiplicative decrease (x `throttle_decrease` per throttle report, optionally a suspension
for `suspend_on_throttle`), additive increase (`recover_step` of the configured limit per
`recover_after` consecutive successes) up to the configured ceiling. Every change is logged
and kept in NATS KV `sluice_sites`, so a restarted scheduler starts from the adapted limits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass

from nats.js import JetStreamContext

from scheduler.shaping import Limits
from sluice import names
from sluice.config import SchedulerConfig
from sluice.kvmirror import kv_current

__all__ = ["Adaptive", "SiteState"]

log = logging.getLogger(__name__)


@dataclass
class SiteState:
    factor: float = 1.0
    suspended_until: float = 0.0
    reason: str = ""
    successes: int = 0


def _key(site_id: str) -> str:
    return hashlib.sha256(site_id.encode()).hexdigest()[:32]


class Adaptive:
    def __init__(self, cfg: SchedulerConfig, js: JetStreamContext) -> None:
        self._cfg = cfg
        self._js = js
        self.states: dict[str, SiteState] = {}

    async def load(self) -> None:
        for value in (await kv_current(self._js, names.SITES_BUCKET)).values():
            data = json.loads(value or b"{}")
            if not isinstance(data, dict) or "site_id" not in data:
                continue  # the scheduler's liveness key shares the bucket
            self.states[data["site_id"]] = SiteState(
                data["factor"], data["suspended_until"], data["reason"]
            )
        log.info("adaptive limits restored for %d sites", len(self.states))

    async def _save(self, site_id: str) -> None:
        st = self.states[site_id]
        kv = await self._js.key_value(names.SITES_BUCKET)
        await kv.put(
            _key(site_id),
            json.dumps(
                {
                    "site_id": site_id,
                    "factor": st.factor,
                    "suspended_until": st.suspended_until,
                    "reason": st.reason,
                }
            ).encode(),
        )

    def current(self, site_id: str, configured: Limits) -> Limits:
        st = self.states.get(site_id)
        if st is None or st.factor >= 1.0:
            return configured
        return dataclasses.replace(
            configured,
            max_connections=max(1, math.floor(configured.max_connections * st.factor)),
            max_message_rate=configured.max_message_rate * st.factor,
            max_connection_rate=configured.max_connection_rate * st.factor,
        )

    def suspended(self, site_id: str) -> float:
        """Seconds the site stays suspended (0 if it is not)."""
        st = self.states.get(site_id)
        return max(0.0, st.suspended_until - time.time()) if st else 0.0

    async def throttled(self, site_id: str, reply: str) -> None:
        st = self.states.setdefault(site_id, SiteState())
        before = st.factor
        st.factor = max(0.01, st.factor * self._cfg.throttle_decrease)
        st.successes = 0
        st.reason = f"throttled: {reply}"[:300]
        if self._cfg.suspend_on_throttle > 0:
            st.suspended_until = time.time() + self._cfg.suspend_on_throttle
        log.warning(
            "site %s throttled (%s): limits x%.2f -> x%.2f%s",
            site_id,
            reply,
            before,
            st.factor,
            f", suspended {self._cfg.suspend_on_throttle:g}s"
            if self._cfg.suspend_on_throttle > 0
            else "",
        )
        await self._save(site_id)

    async def succeeded(self, site_id: str, count: int = 1) -> None:
        st = self.states.get(site_id)
        if st is None or st.factor >= 1.0:
            return
        st.successes += count
        if st.successes < self._cfg.recover_after:
            return
        st.successes = 0
        before = st.factor
        st.factor = min(1.0, st.factor + self._cfg.recover_step)
        st.reason = "recovering after successes" if st.factor < 1.0 else "recovered"
        log.info("site %s recovering: limits x%.2f -> x%.2f", site_id, before, st.factor)
        await self._save(site_id)
