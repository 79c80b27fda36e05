"""The backlog per mail queue, read from JetStream, and the consumers that drain it.

Subjects are sluice.mail.<tier>.<lane>.<domain key>.<tenant>. A queue (one durable consumer)
is one tenant's mail of one tier in one lane, and in the dedicated lane "d" of one domain:
the number of consumers follows busy domains and active tenants, not every domain a blast
touches. Consumers with nothing stored on their subjects are deleted after a while.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from sluice import names
from sluice.config import Config

__all__ = ["Backlog", "Consumers", "Queue", "last_stored", "read_backlog"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Queue:
    tier: names.Tier
    lane: str
    key: str  # the domain key in the dedicated lane; "" for a hash-bucket queue
    tenant: str

    @property
    def bucket(self) -> bool:
        return self.lane != names.DEDICATED_LANE

    @property
    def domain(self) -> str:
        return names.key_domain(self.key)

    @property
    def consumer(self) -> str:
        return names.mail_consumer(self.tier, self.lane, self.key, self.tenant)

    @property
    def filter(self) -> str:
        return names.mail_filter(self.tier, self.lane, self.key, self.tenant)


@dataclass
class Backlog:
    """Messages stored (ready and deferred alike) per queue and per (tier, domain key)."""

    queues: dict[Queue, int] = field(default_factory=dict)
    domains: Counter[tuple[names.Tier, str]] = field(default_factory=Counter)
    # Domain keys with mail in hash-bucket lanes (their sites keep a connection for it).
    bucketed: set[str] = field(default_factory=set)
    # The stream's last sequence when it was read (mail stored since makes it higher), and
    # how many subjects the read named.
    last_seq: int = 0
    subjects: int = 0


# Queues by (tier, lane, key, tenant), made once, and what each subject names, read once: a
# backlog read with a long tail of domains names thousands of subjects a second, and most of
# them map to a few bucket queues.
_queues: dict[tuple[names.Tier, str, str, str], Queue] = {}
_Subject = tuple[tuple[names.Tier, str, str, str], tuple[names.Tier, str], str | None]
_TIERS = {names.tier_token(t): t for t in names.TIERS}


def _queue(ident: tuple[names.Tier, str, str, str]) -> Queue:
    q = _queues.get(ident)
    if q is None:
        if len(_queues) > 100_000:
            _queues.clear()
        q = _queues[ident] = Queue(*ident)
    return q


@functools.lru_cache(maxsize=100_000)
def _subject(subject: str) -> _Subject | None:
    """A mail subject's queue (as a tuple), its (tier, domain key), and the domain key if
    it is in a hash-bucket lane; None for anything else (chunk markers have five tokens)."""
    parts = subject.split(".")
    if len(parts) != 6:
        return None
    _, _, token, lane, key, tenant = parts
    tier = _TIERS.get(token)
    if tier is None:
        return None
    if lane != names.DEDICATED_LANE:
        return (tier, lane, "", tenant), (tier, key), key
    return (tier, lane, key, tenant), (tier, key), None


async def read_backlog(js: JetStreamContext) -> Backlog:
    info = await js.stream_info(names.MAIL_STREAM, subjects_filter=names.MAIL_SUBJECTS)
    # Counted by plain tuples (cheap to hash) in plain dicts (a Counter's += cost as much as
    # the rest of the loop: a long tail names thousands of subjects a read), made queues
    # and a Counter at the end.
    queues: dict[tuple[names.Tier, str, str, str], int] = {}
    domains: dict[tuple[names.Tier, str], int] = {}
    subjects = info.state.subjects or {}
    out = Backlog(last_seq=info.state.last_seq, subjects=len(subjects))
    bucketed = out.bucketed
    for subject, count in subjects.items():
        if count <= 0:
            continue
        read = _subject(subject)
        if read is None:
            continue
        ident, tier_key, bucket_key = read
        if bucket_key is not None:
            bucketed.add(bucket_key)
        queues[ident] = queues.get(ident, 0) + count
        domains[tier_key] = domains.get(tier_key, 0) + count
    out.queues = {_queue(ident): n for ident, n in queues.items()}
    out.domains = Counter(domains)
    return out


async def last_stored(js: JetStreamContext) -> int:
    """The MAIL stream's last sequence: what a read of its state without the subjects says
    (a small answer, against tens of bytes a subject for read_backlog)."""
    info = await js.stream_info(names.MAIL_STREAM)
    return info.state.last_seq


class Consumers:
    """The durable pull consumers of the mail queues: created on demand (cached), deleted
    when nothing has been stored on their subjects for `[scheduler] consumer_idle`.

    Only a consumer with nothing stored is deleted, so no NAK-delayed message loses its
    delay and no MaxDeliver-spent message comes back through a new consumer.
    """

    def __init__(self, js: JetStreamContext, cfg: Config) -> None:
        self._js = js
        self._cfg = cfg
        self._known: set[str] = set()
        self._empty_since: dict[str, float] = {}

    async def ensure(self, q: Queue) -> str:
        durable = q.consumer
        if durable in self._known:
            return durable
        try:
            await self._js.consumer_info(names.MAIL_STREAM, durable)
        except NotFoundError:
            await self._js.add_consumer(
                names.MAIL_STREAM,
                js_api.ConsumerConfig(
                    durable_name=durable,
                    filter_subject=q.filter,
                    ack_policy=js_api.AckPolicy.EXPLICIT,
                    ack_wait=self._cfg.deliverer.ack_wait,
                    max_deliver=self._cfg.retry.max_deliver,
                    # NAK-delayed messages count against this; keep it far above ready work.
                    max_ack_pending=10_000,
                ),
            )
            log.info("created consumer %s", durable)
        self._known.add(durable)
        return durable

    async def collect(self, backlog: Backlog, leased: set[str]) -> int:
        """Delete consumers that have had nothing stored for `consumer_idle`; returns how
        many were deleted."""
        now = time.monotonic()
        busy = {q.consumer for q, n in backlog.queues.items() if n > 0} | leased
        deleted = 0
        for info in await self._js.consumers_info(names.MAIL_STREAM):
            name = info.name
            if not name.startswith("mail_") or name in busy:
                self._empty_since.pop(name, None)
                continue
            if info.num_pending or info.num_ack_pending:
                continue  # stored after the backlog was read
            since = self._empty_since.setdefault(name, now)
            if now - since < self._cfg.scheduler.consumer_idle:
                continue
            try:
                await self._js.delete_consumer(names.MAIL_STREAM, name)
                deleted += 1
                log.info("deleted idle consumer %s", name)
            except NotFoundError:
                pass
            self._known.discard(name)
            self._empty_since.pop(name, None)
        return deleted
