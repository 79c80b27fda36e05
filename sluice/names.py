"""Every NATS name Sluice uses: streams, subjects, consumers, KV and object-store buckets.

These are wire contracts (docs/nats.md); change them deliberately.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from typing import TypeAlias

from sluice.v1 import messages_pb2

__all__ = [
    "DLQ_STREAM",
    "EVENTS_STREAM",
    "EXPANDER_CONSUMER",
    "JOBS_STREAM",
    "KEYS_BUCKET",
    "MAIL_STREAM",
    "TENANTS_BUCKET",
    "TIERS",
    "WEBHOOKS_CONSUMER",
    "bucket_lane",
    "dlq_subject",
    "domain_key",
    "event_subject",
    "event_token",
    "job_subject",
    "mail_consumer",
    "mail_filter",
    "mail_subject",
    "tier_from_token",
    "tier_token",
]

JOBS_STREAM = "JOBS"
MAIL_STREAM = "MAIL"
EVENTS_STREAM = "EVENTS"
DLQ_STREAM = "DLQ"

TENANTS_BUCKET = "sluice_tenants"
KEYS_BUCKET = "sluice_keys"
IDEMPOTENCY_BUCKET = "sluice_idempotency"
# Expander checkpoints: job id -> next chunk and the sequence of its last chunk marker.
EXPANDER_BUCKET = "sluice_expander"
# Suppressed recipients: "<tenant>.<sha256 of the address>" -> reason.
SUPPRESSIONS_BUCKET = "sluice_suppressions"
# Adapted site limits and suspensions: sha256(site id) -> JSON state.
SITES_BUCKET = "sluice_sites"
# The scheduler leader lock (key "leader") and the mark of a recently active one ("active").
SCHEDULER_BUCKET = "sluice_scheduler"

EXPANDER_CONSUMER = "expander"
# Per-endpoint webhook deliveries (fanned out from EVENTS).
WEBHOOKS_STREAM = "WEBHOOKS"
WEBHOOKS_SUBJECTS = "sluice.webhooks.>"
WEBHOOK_DELIVERY_CONSUMER = "webhook_delivery"
REAPER_CONSUMER = "reaper"
# Captures MAX_DELIVERIES advisories of the MAIL stream's consumers (they are at-most-once).
ADVISORIES_STREAM = "ADVISORIES"
ADVISORIES_SUBJECTS = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.MAIL.>"
WEBHOOKS_CONSUMER = "webhooks"

JOBS_SUBJECTS = "sluice.jobs.>"
MAIL_SUBJECTS = "sluice.mail.>"
EVENTS_SUBJECTS = "sluice.events.>"
DLQ_SUBJECTS = "sluice.dlq.>"
# Webhook deliveries that ran out of retries (also in the DLQ stream, one per subject).
WEBHOOK_DLQ_SUBJECTS = "sluice.webhook_dlq.>"

Tier: TypeAlias = messages_pb2.Tier.ValueType
EventType: TypeAlias = messages_pb2.EventType.ValueType

# Highest first: the order deliverers pull in.
TIERS: tuple[Tier, ...] = (
    messages_pb2.TIER_CRITICAL,
    messages_pb2.TIER_TRANSACTIONAL,
    messages_pb2.TIER_BULK,
)
_TIER_TOKENS = {
    messages_pb2.TIER_CRITICAL: "critical",
    messages_pb2.TIER_TRANSACTIONAL: "transactional",
    messages_pb2.TIER_BULK: "bulk",
}
_TOKEN_TIERS = {v: k for k, v in _TIER_TOKENS.items()}

_TOKEN = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def tier_token(tier: Tier) -> str:
    """The subject token of a tier; TIER_UNSPECIFIED is not a queue."""
    try:
        return _TIER_TOKENS[tier]
    except KeyError:
        raise ValueError(f"no queue for tier {tier}") from None


def tier_from_token(token: str) -> Tier:
    return _TOKEN_TIERS[token]


def domain_key(domain: str) -> str:
    """The subject token of a recipient domain: IDNA A-label, lower-case, dots as '_'.

    Valid mail domains contain no '_', so the mapping is reversible.
    """
    ascii_domain = domain.strip().rstrip(".").encode("idna").decode("ascii").lower()
    key = ascii_domain.replace(".", "_")
    if not _TOKEN.match(key):
        raise ValueError(f"not a mail domain: {domain!r}")
    return key


def key_domain(key: str) -> str:
    return key.replace("_", ".")


def domain_key_of(domain: str) -> str:
    """key_domain's inverse, for a domain that came from a key (already an A-label in
    lower case): no IDNA round trip, unlike domain_key."""
    return domain.replace(".", "_")


def job_subject(tier: Tier, batch_id: str) -> str:
    """One subject per batch, so a pending job can be found by id (status lookups)."""
    return f"sluice.jobs.{tier_token(tier)}.{batch_id}"


# Mail lanes. A busy domain (many recipients in one job, or listed in KV `sluice_lanes`) has
# its own queues, lane "d"; every other domain goes to one of a fixed set of hash buckets,
# lanes "b00".."bNN", so the number of consumers does not grow with the number of domains.
DEDICATED_LANE = "d"
LANES_BUCKET = "sluice_lanes"


def bucket_lane(key: str, buckets: int) -> str:
    """The hash-bucket lane of a domain key (stable across processes and releases)."""
    return f"b{zlib.crc32(key.encode()) % max(1, buckets):02d}"


def mail_subject(tier: Tier, lane: str, key: str, tenant_id: str) -> str:
    """sluice.mail.<tier>.<lane>.<domain key>.<tenant>: the tenant token lets deliverers share
    a site fairly between tenants; the domain token keeps per-domain backlog visible."""
    return f"sluice.mail.{tier_token(tier)}.{lane}.{key}.{tenant_id}"


def mail_filter(tier: Tier, lane: str, key: str, tenant_id: str) -> str:
    """The filter of a queue: one domain of one tenant (dedicated lane), or every domain of
    a bucket lane of one tenant (key "")."""
    return f"sluice.mail.{tier_token(tier)}.{lane}.{key or '*'}.{tenant_id}"


def mail_consumer(tier: Tier, lane: str, key: str, tenant_id: str) -> str:
    """The durable pull consumer of a queue (long domain keys are hashed to fit)."""
    if len(key) > 64:
        key = hashlib.sha256(key.encode()).hexdigest()[:24]
    name = f"mail_{tier_token(tier)}_{lane}_{tenant_id}"
    return f"{name}_{key}" if key else name


def event_token(event_type: EventType) -> str:
    """ "delivered" for EVENT_TYPE_DELIVERED, and so on."""
    token = _EVENT_TOKENS.get(event_type)
    if token is None:  # (ValueError for a number the enum does not have)
        token = messages_pb2.EventType.Name(event_type).removeprefix("EVENT_TYPE_").lower()
    return token


# (an event's subject and id name its type: worked out once, not per event)
_EVENT_TOKENS: dict[int, str] = {
    v.number: v.name.removeprefix("EVENT_TYPE_").lower()
    for v in messages_pb2.EventType.DESCRIPTOR.values
}


def event_subject(tenant_id: str, event_type: EventType, job_id: str, index: int | str) -> str:
    """Events are keyed by job and recipient index ("job" for job-level events), so a
    message's history and a job's counts are subject-filtered reads."""
    return f"sluice.events.{tenant_id}.{event_token(event_type)}.{job_id}.{index}"


def dlq_subject(tenant_id: str, delivery_id: str) -> str:
    """One subject per dead letter, so that a create-only publish cannot duplicate it."""
    return f"sluice.dlq.{tenant_id}.{delivery_id}"


def webhook_subject(tenant_id: str, endpoint_id: str) -> str:
    return f"sluice.webhooks.{tenant_id}.{_token(endpoint_id)}"


def webhook_dlq_subject(tenant_id: str, endpoint_id: str, event_id: str) -> str:
    """One subject per (event, endpoint) that ran out of retries."""
    return f"sluice.webhook_dlq.{tenant_id}.{_token(endpoint_id)}.{_token(event_id)}"


def _token(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", value) or "_"


# The layout every service needs (nats_layout.ensure_layout creates it, health checks it):
# the streams, and the KV buckets made with the default settings. The object store is made on
# first use, the scheduler's leader-lock bucket by ensure_layout with settings of its own.
STREAMS = (JOBS_STREAM, MAIL_STREAM, EVENTS_STREAM, DLQ_STREAM, WEBHOOKS_STREAM, ADVISORIES_STREAM)
KV_BUCKETS = (
    TENANTS_BUCKET,
    KEYS_BUCKET,
    IDEMPOTENCY_BUCKET,
    EXPANDER_BUCKET,
    SUPPRESSIONS_BUCKET,
    SITES_BUCKET,
    LANES_BUCKET,
)
