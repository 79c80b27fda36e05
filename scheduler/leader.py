"""The leader lock: of several scheduler processes exactly one is active.

The lock is the key `leader` of KV bucket `sluice_scheduler` (one revision per key). A
contender writes it create-only (expected last subject sequence 0) with a per-message TTL of
`[scheduler] leader_ttl`; the holder renews it every third of that with revision-checked
updates. If the holder dies the server removes the entry when its TTL runs out and the next
create succeeds. The holder counts itself active only until `leader_ttl` after the start of
its last successful write, and the server keeps the entry at least that long, so two
schedulers are never active at once (given clocks that run at the same rate).

A new leader knows none of the old one's leases. Before each write the holder also marks the
key `active` with a TTL of `leader_ttl` + `drain`, so the marker outlives every lease the
holder may have granted (and the deliverers' moment to notice its expiry). A contender that
wins while the marker is present took over from a leader whose leases may still be in use:
it must grant nothing for `drain` seconds (`took_over`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import (
    APIError,
    KeyDeletedError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
)
from nats.js.kv import KeyValue

from sluice import names
from sluice.nats_layout import kv_put_ttl

__all__ = ["ACTIVE_KEY", "LEADER_KEY", "LeaderLock"]

log = logging.getLogger(__name__)

LEADER_KEY = "leader"
ACTIVE_KEY = "active"

# JetStream's "wrong last sequence" errors: someone else wrote the key since our revision.
_WRONG_LAST_SEQUENCE = (10071, 10164)


class LeaderLock:
    """One contender for the scheduler leader lock; `holder` names it (shown to others)."""

    def __init__(
        self,
        js: JetStreamContext,
        holder: str,
        ttl: float,
        lease_ttl: float,
        bucket: str = names.SCHEDULER_BUCKET,
    ) -> None:
        self._js = js
        self.holder = holder
        # The server counts TTLs in whole seconds; local validity uses the same figure.
        self.ttl = float(max(1, math.ceil(ttl)))
        # Leases of a previous leader end within one lease TTL of its last grant; deliverers
        # notice an unrenewed lease's expiry within their renew interval (at most a third
        # of lease_ttl), so a new leader waits this long before granting.
        self.drain = lease_ttl * 4 / 3
        self._bucket = bucket
        self._kv: KeyValue | None = None
        self._revision = 0
        self._valid_until = 0.0
        # Set when this process wins the lock: a previous leader's leases may be in use.
        self.took_over = False
        # The holder of the lock as last seen by a contender that lost ("" unknown).
        self.seen_holder = ""

    async def _bucket_kv(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self._js.key_value(self._bucket)
        return self._kv

    def valid(self) -> bool:
        """Whether this process may act as the leader right now."""
        return self._revision > 0 and time.monotonic() < self._valid_until

    async def _mark_active(self) -> None:
        await kv_put_ttl(
            self._js, self._bucket, ACTIVE_KEY, self.holder.encode(), self.ttl + self.drain
        )

    async def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; True when this process now holds it."""
        kv = await self._bucket_kv()
        started = time.monotonic()
        try:
            revision = await kv.create(LEADER_KEY, self.holder.encode(), msg_ttl=self.ttl)
        except KeyWrongLastSequenceError:
            with contextlib.suppress(KeyNotFoundError, KeyDeletedError):
                entry = await kv.get(LEADER_KEY)
                self.seen_holder = (entry.value or b"").decode()
            return False
        self._revision = revision
        try:
            await kv.get(ACTIVE_KEY)
            self.took_over = True
        except (KeyNotFoundError, KeyDeletedError):
            self.took_over = False
        await self._mark_active()
        self._valid_until = started + self.ttl
        self.seen_holder = self.holder
        return True

    async def renew(self) -> bool:
        """Extend the lock; False when it is lost (it expired, or another process holds it).
        Other failures (NATS unreachable) raise: the lock stays valid until its time is up."""
        if self._revision == 0:
            return False
        started = time.monotonic()
        await self._mark_active()
        try:
            ack = await self._js.publish(
                f"$KV.{self._bucket}.{LEADER_KEY}",
                self.holder.encode(),
                timeout=self.ttl / 3,
                headers={js_api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE: str(self._revision)},
                msg_ttl=self.ttl,
            )
        except APIError as exc:
            if exc.err_code in _WRONG_LAST_SEQUENCE:
                self._revision = 0
                self._valid_until = 0.0
                return False
            raise
        self._revision = ack.seq
        self._valid_until = started + self.ttl
        return True

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait as a standby until this process holds the lock (True) or `stop` (False)."""
        waiting_logged = False
        while not stop.is_set():
            try:
                if await self.try_acquire():
                    return True
                if not waiting_logged:
                    log.info(
                        "scheduler %s is a standby; the active one is %s",
                        self.holder,
                        self.seen_holder or "unknown",
                    )
                    waiting_logged = True
            except Exception as exc:
                log.warning("leader lock: %r", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.ttl / 4)
        return False

    async def hold(self, stop: asyncio.Event) -> None:
        """Renew every third of the TTL; returns on `stop` or once the lock is lost."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.ttl / 3)
            if stop.is_set():
                return
            try:
                if not await self.renew():
                    log.warning("scheduler %s lost the leader lock", self.holder)
                    return
            except Exception as exc:
                # Still ours until its time is up; after that the servicer refuses calls.
                log.warning("leader lock renewal failed: %r", exc)

    async def release(self) -> None:
        """Give the lock up (a clean stop): a standby takes over at once, though it still
        waits out this process's leases (the `active` marker stays)."""
        if not self.valid():
            return
        revision, self._revision, self._valid_until = self._revision, 0, 0.0
        kv = await self._bucket_kv()
        try:
            await kv.delete(LEADER_KEY, last=revision)
        except Exception as exc:
            log.warning("leader lock release failed (it expires by itself): %r", exc)
