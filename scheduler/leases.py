"""The lease table: who may open how many connections to which site, until when."""

from __future__ import annotations

import heapq
import secrets
import time
from dataclasses import dataclass, field

from scheduler.shaping import Limits

__all__ = ["LANE_PREFIX", "LeaseState", "LeaseTable"]


@dataclass
class LeaseState:
    lease_id: str
    site_id: str
    deliverer_id: str
    connections: int
    limits: Limits
    expires_at: float
    domains: list[str] = field(default_factory=list)
    # "site": a site's dedicated queues; "lane": a hash-bucket lane (site_id "lane:<lane>");
    # "domain": one connection on a site for mail taken from a lane.
    kind: str = "site"
    # Taken back (the site's limit fell): its holder hears of it at its next renewal, and
    # its connections still count against the site until the holder releases it (having
    # closed them) or it expires. Freed at the renewal, they were granted again while the
    # holder's connections were still closing: a server saw 4 against a limit of 3.
    revoked: bool = False
    # A lane's second holder (Scheduler._share_lane): not counted when lanes are shared out
    # whole between deliverers.
    shared: bool = False

    @property
    def lane(self) -> str:
        """The hash-bucket lane of a lane lease ("" for the other kinds)."""
        return self.site_id.removeprefix(LANE_PREFIX) if self.kind == "lane" else ""

    @property
    def whole_lane(self) -> bool:
        """A lane lease that counts in the deal of lanes between deliverers (not shared)."""
        return self.kind == "lane" and not self.shared


# The site id under which a hash-bucket lane's lease is kept.
LANE_PREFIX = "lane:"


class LeaseTable:
    """Grants never let the connections of a site's live leases exceed its limit.

    Every operation is O(1) or O(log n) in the number of leases (a long tail of domains
    means thousands of short one-connection leases): expiry times sit in a heap (a renewal
    pushes a new entry; stale ones are skipped when popped) and connections in use are
    counted per site."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._leases: dict[str, LeaseState] = {}
        # The same leases by holder: a call for work asks what its caller holds several
        # times, and a long tail keeps thousands of leases live.
        self._held: dict[str, dict[str, LeaseState]] = {}
        self._expiry: list[tuple[float, str]] = []
        self._in_use: dict[str, int] = {}

    def expire(self, now: float | None = None) -> list[LeaseState]:
        now = time.time() if now is None else now
        gone = []
        while self._expiry and self._expiry[0][0] <= now:
            _, lease_id = heapq.heappop(self._expiry)
            ls = self._leases.get(lease_id)
            if ls is not None and ls.expires_at <= now:
                self._drop(ls)
                gone.append(ls)
        return gone

    def in_use(self, site_id: str) -> int:
        return self._in_use.get(site_id, 0)

    def held_by(self, deliverer_id: str) -> list[LeaseState]:
        return list(self._held.get(deliverer_id, {}).values())

    def get(self, lease_id: str) -> LeaseState | None:
        return self._leases.get(lease_id)

    def grant(
        self,
        site_id: str,
        deliverer_id: str,
        limits: Limits,
        domains: list[str],
        share: int | None = None,
        kind: str = "site",
        reserve: int = 0,
    ) -> LeaseState | None:
        """A new lease for up to `share` of the site's free connections, keeping `reserve`
        of them free, or None if there are none."""
        self.expire()
        free = limits.max_connections - reserve - self.in_use(site_id)
        if free <= 0:
            return None
        if share is not None:
            free = min(free, share)
        lease = LeaseState(
            lease_id=f"lease_{secrets.token_hex(8)}",
            site_id=site_id,
            deliverer_id=deliverer_id,
            connections=free,
            limits=limits,
            expires_at=time.time() + self.ttl,
            domains=domains,
            kind=kind,
        )
        self._leases[lease.lease_id] = lease
        self._held.setdefault(deliverer_id, {})[lease.lease_id] = lease
        self._in_use[site_id] = self.in_use(site_id) + free
        heapq.heappush(self._expiry, (lease.expires_at, lease.lease_id))
        return lease

    def renew(self, deliverer_id: str, lease_id: str) -> LeaseState | None:
        """The lease, extended; None if its holder no longer has it (a revoked lease is not
        extended: its holder stops working it, and releases it once its connections are
        closed, or it expires)."""
        self.expire()
        ls = self._leases.get(lease_id)
        if ls is None or ls.deliverer_id != deliverer_id or ls.revoked:
            return None
        ls.expires_at = time.time() + self.ttl
        heapq.heappush(self._expiry, (ls.expires_at, lease_id))
        return ls

    def revoke(self, lease_id: str) -> None:
        """Take a lease back: its holder is told at its next renewal (see LeaseState)."""
        ls = self._leases.get(lease_id)
        if ls is not None:
            ls.revoked = True

    def release(self, deliverer_id: str, lease_id: str) -> None:
        ls = self._leases.get(lease_id)
        if ls is not None and ls.deliverer_id == deliverer_id:
            self._drop(ls)

    def all(self) -> list[LeaseState]:
        self.expire()
        return list(self._leases.values())

    def _drop(self, ls: LeaseState) -> None:
        del self._leases[ls.lease_id]
        held = self._held[ls.deliverer_id]
        del held[ls.lease_id]
        if not held:
            del self._held[ls.deliverer_id]
        left = self._in_use[ls.site_id] - ls.connections
        if left:
            self._in_use[ls.site_id] = left
        else:
            del self._in_use[ls.site_id]
