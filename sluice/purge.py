"""Remove everything Sluice holds for one tenant (`sluice tenants purge`, docs/storage.md).

Order matters: the API keys go first so no new mail arrives; payload references are
collected from the job records, queued pointers, dead letters and `accepted` events before
those are purged; the tenant record goes last, so a purge cut short can be run again.
Streams are purged by subject (`$JS.API.STREAM.PURGE` with a filter), which removes the
messages outright. KV entries that services watch (suppressions, tenants, keys) are first
purged key by key, so watchers see them go, then their purge markers are removed too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from sluice import names
from sluice.config import Config
from sluice.kvmirror import kv_current
from sluice.store import PayloadStore, StoreError
from sluice.tenants import TenantStore, valid_tenant_id
from sluice.v1 import messages_pb2

__all__ = ["PurgeReport", "purge_tenant"]

log = logging.getLogger(__name__)


@dataclass
class PurgeReport:
    """What a purge removed, by kind."""

    removed: dict[str, int] = field(default_factory=dict)
    # Payload URIs that could not be deleted (the store was unreachable, for example).
    payload_errors: list[str] = field(default_factory=list)

    def add(self, kind: str, n: int) -> None:
        self.removed[kind] = self.removed.get(kind, 0) + n


async def _purge_subject(nc: NatsClient, stream: str, subject: str) -> int:
    """Purge a stream's messages on subject; the number removed (nats-py drops it)."""
    resp = await nc.request(
        f"$JS.API.STREAM.PURGE.{stream}", json.dumps({"filter": subject}).encode(), timeout=30
    )
    body = json.loads(resp.data)
    if "error" in body:
        if body["error"].get("err_code") == 10059:  # stream not found
            return 0
        raise RuntimeError(f"purge {stream} {subject}: {body['error']}")
    return int(body.get("purged", 0))


async def _scan(
    js: JetStreamContext, stream: str, subject: str
) -> AsyncIterator[tuple[int, bytes]]:
    """(sequence, data) of every message on subject, oldest first; bounded by the stream's
    last sequence at the start."""
    try:
        last = (await js.stream_info(stream)).state.last_seq
    except NotFoundError:
        return
    seq = 1
    while seq <= last:
        try:
            msg = await js.get_msg(stream, seq=seq, subject=subject, next=True)
        except NotFoundError:
            return
        if msg.seq is None or msg.seq > last:
            return
        yield msg.seq, msg.data or b""
        seq = msg.seq + 1


def _base(uri: str) -> str:
    """A payload object's URI without the `#<i>` that names one message of a batch."""
    return uri.split("#", 1)[0]


async def _collect_and_drop_jobs(
    js: JetStreamContext, tenant_id: str, refs: set[str], report: PurgeReport
) -> None:
    """Job records not yet expanded: JOBS subjects carry no tenant, so read them."""
    async for seq, data in _scan(js, names.JOBS_STREAM, names.JOBS_SUBJECTS):
        try:
            batch = messages_pb2.JobBatch.FromString(data)
        except Exception:
            continue
        if not batch.jobs or any(j.tenant_id != tenant_id for j in batch.jobs):
            continue
        for job in batch.jobs:
            refs.update(_base(r) for r in (job.payload_ref, job.recipients_ref) if r)
        try:
            await js.delete_msg(names.JOBS_STREAM, seq)
        except NotFoundError:
            continue  # expanded meanwhile; its pointers are purged below
        report.add("jobs", 1)


async def _kv_keys(js: JetStreamContext, bucket: str, pattern: str) -> list[str]:
    """Keys matching a subject pattern (nats-py's `keys(filters=...)` matches substrings)."""
    return list(await kv_current(js, bucket, pattern, keys_only=True))


async def _purge_kv(
    nc: NatsClient, js: JetStreamContext, bucket: str, keys: list[str], marker_subject: str
) -> int:
    """Purge keys one by one (watchers see each go), then drop the purge markers."""
    kv = await js.key_value(bucket)
    for key in keys:
        await kv.purge(key)
    await _purge_subject(nc, f"KV_{bucket}", marker_subject)
    return len(keys)


async def purge_tenant(
    nc: NatsClient, cfg: Config, store: PayloadStore, tenant_id: str
) -> PurgeReport:
    """Remove the tenant's API keys, job records, queued pointers, webhook deliveries,
    events, dead letters, payloads, suppressions, idempotency keys and tenant record."""
    if not valid_tenant_id(tenant_id):
        raise ValueError(f"invalid tenant id {tenant_id!r}")
    js = nc.jetstream()
    report = PurgeReport()

    # 1. No new mail: the tenant's API keys.
    tenants = TenantStore(js)
    digests = [d for d, k in await tenants.list_keys() if k.tenant_id == tenant_id]
    kv_keys = await js.key_value(names.KEYS_BUCKET)
    for digest in digests:
        await kv_keys.purge(digest)
        await _purge_subject(nc, f"KV_{names.KEYS_BUCKET}", f"$KV.{names.KEYS_BUCKET}.{digest}")
    report.add("api_keys", len(digests))

    # 2. Payload references, before what carries them is purged.
    refs: set[str] = set()
    await _collect_and_drop_jobs(js, tenant_id, refs, report)
    mail_subject = f"sluice.mail.*.*.*.{tenant_id}"
    async for _, data in _scan(js, names.MAIL_STREAM, mail_subject):
        refs.add(_base(messages_pb2.DeliveryPointer.FromString(data).payload_ref))
    async for _, data in _scan(js, names.DLQ_STREAM, f"sluice.dlq.{tenant_id}.>"):
        refs.add(_base(messages_pb2.DeadLetter.FromString(data).pointer.payload_ref))
    # Delivered mail left no pointer: its job ids are in the `accepted` events, and its
    # payload (if still in the store being written to) is named after the job.
    writer = urlsplit(cfg.store.url)
    accepted = f"sluice.events.{tenant_id}.accepted.>"
    async for _, data in _scan(js, names.EVENTS_STREAM, accepted):
        job_id = messages_pb2.Event.FromString(data).job_id
        if job_id:
            refs.add(f"{writer.scheme}://{writer.netloc}/{job_id}")
            refs.add(f"{writer.scheme}://{writer.netloc}/{job_id}.recipients")
    refs.discard("")

    # 3. Streams, by subject.
    for kind, stream, subject in (
        ("mail_pointers", names.MAIL_STREAM, mail_subject),
        ("webhook_deliveries", names.WEBHOOKS_STREAM, f"sluice.webhooks.{tenant_id}.>"),
        ("events", names.EVENTS_STREAM, f"sluice.events.{tenant_id}.>"),
        ("dead_letters", names.DLQ_STREAM, f"sluice.dlq.{tenant_id}.>"),
        ("webhook_dead_letters", names.DLQ_STREAM, f"sluice.webhook_dlq.{tenant_id}.>"),
    ):
        report.add(kind, await _purge_subject(nc, stream, subject))

    # 4. Payloads (deleting one that is already gone is not an error).
    deleted = 0
    for uri in sorted(refs):
        try:
            await store.delete(uri)
            deleted += 1
        except StoreError as exc:
            log.warning("purge %s: payload %s: %s", tenant_id, uri, exc)
            report.payload_errors.append(uri)
    report.add("payload_refs", deleted)

    # 5. Suppressions (watched by the expander) and idempotency keys (not watched).
    supp = await _kv_keys(js, names.SUPPRESSIONS_BUCKET, f"{tenant_id}.*")
    report.add(
        "suppressions",
        await _purge_kv(
            nc,
            js,
            names.SUPPRESSIONS_BUCKET,
            supp,
            f"$KV.{names.SUPPRESSIONS_BUCKET}.{tenant_id}.>",
        ),
    )
    report.add(
        "idempotency_keys",
        await _purge_subject(
            nc, f"KV_{names.IDEMPOTENCY_BUCKET}", f"$KV.{names.IDEMPOTENCY_BUCKET}.{tenant_id}.>"
        ),
    )

    # 6. The tenant record, last: a purge cut short can be run again.
    had_tenant = await tenants.get_tenant(tenant_id) is not None
    if had_tenant:
        await _purge_kv(
            nc, js, names.TENANTS_BUCKET, [tenant_id], f"$KV.{names.TENANTS_BUCKET}.{tenant_id}"
        )
    report.add("tenant", int(had_tenant))
    return report
