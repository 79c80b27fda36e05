"""`sluice tenants purge` against a real nats-server: two tenants with data everywhere; one is
purged, the other keeps every byte."""

from __future__ import annotations

from typing import Any

import pytest
from nats.js import JetStreamContext

from sluice import config as config_mod
from sluice import names, suppressions
from sluice.config import Config
from sluice.nats_layout import connect, ensure_layout, kv_put_ttl
from sluice.natsserver import NatsServer
from sluice.store import PayloadNotFound, PayloadStore, open_store
from sluice.tenants import TenantStore, now_ts
from sluice.v1 import messages_pb2, tenant_pb2
from tests.api import sluice_cli

TENANTS = ("acme", "globex")


async def _seed(js: JetStreamContext, store: PayloadStore, tenant: str) -> dict[str, str]:
    """One of everything for a tenant; the payload URIs written."""
    ts = TenantStore(js)
    await ts.put_tenant(
        tenant_pb2.Tenant(
            tenant_id=tenant, allowed_from_domains=[f"{tenant}.test"], created_at=now_ts()
        )
    )
    await ts.create_key(tenant)
    uris = {
        kind: await store.put(f"job_{tenant}_{kind}", f"{tenant} {kind}".encode())
        for kind in ("queued", "dead", "delivered", "pending")
    }
    tier = messages_pb2.TIER_TRANSACTIONAL
    # A job record not yet expanded.
    batch = messages_pb2.JobBatch(
        batch_id=f"job_{tenant}_pending",
        jobs=[
            messages_pb2.JobRecord(
                job_id=f"job_{tenant}_pending",
                tenant_id=tenant,
                tier=tier,
                payload_ref=uris["pending"],
            )
        ],
    )
    await js.publish(names.job_subject(tier, batch.batch_id), batch.SerializeToString())
    # Queued pointers, on a bucket lane and a dedicated lane.
    for i, lane in enumerate(("b03", "d")):
        pointer = messages_pb2.DeliveryPointer(
            delivery_id=f"job_{tenant}_queued-{i}",
            job_id=f"job_{tenant}_queued",
            tenant_id=tenant,
            tier=tier,
            recipient=f"user{i}@mail.test",
            payload_ref=uris["queued"],
        )
        await js.publish(
            names.mail_subject(tier, lane, "mail_test", tenant), pointer.SerializeToString()
        )
    # A dead letter and a webhook dead letter.
    dead = messages_pb2.DeadLetter(
        pointer=messages_pb2.DeliveryPointer(
            delivery_id=f"job_{tenant}_dead-0",
            tenant_id=tenant,
            payload_ref=uris["dead"],
        ),
        reason=messages_pb2.DEAD_LETTER_REASON_BOUNCED,
    )
    await js.publish(names.dlq_subject(tenant, f"job_{tenant}_dead-0"), dead.SerializeToString())
    await js.publish(names.webhook_dlq_subject(tenant, "ep1", "evt1"), b"webhook delivery")
    await js.publish(names.webhook_subject(tenant, "ep1"), b"webhook delivery")
    # Events, among them the `accepted` of a job whose mail was delivered (no pointer left).
    for job, event_type, index in (
        (f"job_{tenant}_delivered", messages_pb2.EVENT_TYPE_ACCEPTED, "job"),
        (f"job_{tenant}_delivered", messages_pb2.EVENT_TYPE_DELIVERED, 0),
    ):
        event = messages_pb2.Event(event_id=f"{job}-{index}", type=event_type, job_id=job)
        await js.publish(
            names.event_subject(tenant, event_type, job, index), event.SerializeToString()
        )
    # Suppressions and an idempotency key.
    await suppressions.put(
        js, tenant, "bounced@mail.test", "bad_mailbox", messages_pb2.SUPPRESSION_SOURCE_BOUNCE
    )
    await suppressions.put(
        js, tenant, "full@mail.test", "mailbox_full", messages_pb2.SUPPRESSION_SOURCE_BOUNCE, 3600
    )
    await kv_put_ttl(js, names.IDEMPOTENCY_BUCKET, f"{tenant}.{'a' * 40}", b"D", 3600)
    return uris


async def _counts(js: JetStreamContext, tenant: str) -> dict[str, int]:
    async def stored(stream: str, subject: str) -> int:
        info = await js.stream_info(stream, subjects_filter=subject)
        return sum((info.state.subjects or {}).values())

    ts = TenantStore(js)
    jobs = 0
    info = await js.stream_info(names.JOBS_STREAM, subjects_filter=names.JOBS_SUBJECTS)
    for subject in info.state.subjects or {}:
        msg = await js.get_last_msg(names.JOBS_STREAM, subject)
        batch = messages_pb2.JobBatch.FromString(msg.data or b"")
        jobs += sum(1 for j in batch.jobs if j.tenant_id == tenant)
    return {
        "tenant": int(await ts.get_tenant(tenant) is not None),
        "api_keys": sum(1 for _, k in await ts.list_keys() if k.tenant_id == tenant),
        "jobs": jobs,
        "mail": await stored(names.MAIL_STREAM, f"sluice.mail.*.*.*.{tenant}"),
        "events": await stored(names.EVENTS_STREAM, f"sluice.events.{tenant}.>"),
        "dead_letters": await stored(names.DLQ_STREAM, f"sluice.dlq.{tenant}.>"),
        "webhook_dlq": await stored(names.DLQ_STREAM, f"sluice.webhook_dlq.{tenant}.>"),
        "webhooks": await stored(names.WEBHOOKS_STREAM, f"sluice.webhooks.{tenant}.>"),
        "suppressions": len(await suppressions.list_tenant(js, tenant)),
        # Raw KV subjects: the purge markers must be gone too.
        "suppression_subjects": await stored(
            f"KV_{names.SUPPRESSIONS_BUCKET}", f"$KV.{names.SUPPRESSIONS_BUCKET}.{tenant}.>"
        ),
        "idempotency_keys": await stored(
            f"KV_{names.IDEMPOTENCY_BUCKET}", f"$KV.{names.IDEMPOTENCY_BUCKET}.{tenant}.>"
        ),
        "tenant_subjects": await stored(
            f"KV_{names.TENANTS_BUCKET}", f"$KV.{names.TENANTS_BUCKET}.{tenant}"
        ),
    }


SEEDED = {
    "tenant": 1,
    "api_keys": 1,
    "jobs": 1,
    "mail": 2,
    "events": 2,
    "dead_letters": 1,
    "webhook_dlq": 1,
    "webhooks": 1,
    "suppressions": 2,
    "suppression_subjects": 2,
    "idempotency_keys": 1,
    "tenant_subjects": 1,
}


async def _payloads(store: PayloadStore, uris: dict[str, str]) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for kind, uri in uris.items():
        try:
            out[kind] = await store.get(uri)
        except PayloadNotFound:
            out[kind] = None
    return out


@pytest.fixture
def cfg(nats_server: NatsServer) -> Config:
    return config_mod.replace(config_mod.Config(), nats={"url": nats_server.url})


async def test_purge_removes_one_tenant_and_keeps_the_other(
    nats_server: NatsServer, cfg: Config
) -> None:
    nc = await connect(cfg, "test")
    js = nc.jetstream()
    await ensure_layout(js, cfg)
    store = open_store(cfg.store, js, cfg.nats.replicas)
    try:
        uris = {t: await _seed(js, store, t) for t in TENANTS}
        before = {t: await _counts(js, t) for t in TENANTS}
        assert before == {t: SEEDED for t in TENANTS}

        refused = sluice_cli(nats_server.url, "tenants", "purge", "acme")
        assert refused.returncode == 2 and "--yes" in refused.stderr
        assert await _counts(js, "acme") == SEEDED  # nothing happened without --yes

        done = sluice_cli(nats_server.url, "tenants", "purge", "acme", "--yes")
        assert done.returncode == 0, done.stderr
        report: dict[str, Any] = dict(line.split("\t") for line in done.stdout.splitlines())
        assert report["mail_pointers"] == "2"
        assert report["events"] == "2"
        assert report["dead_letters"] == "1"
        assert report["jobs"] == "1"
        assert report["suppressions"] == "2"
        assert report["tenant"] == "1"

        after = {t: await _counts(js, t) for t in TENANTS}
        assert after["acme"] == dict.fromkeys(SEEDED, 0)
        assert after["globex"] == SEEDED
        assert await _payloads(store, uris["acme"]) == dict.fromkeys(uris["acme"])
        assert await _payloads(store, uris["globex"]) == {
            k: f"globex {k}".encode() for k in uris["globex"]
        }

        # Running it again (a purge cut short, or data that arrived late) is harmless.
        again = sluice_cli(nats_server.url, "tenants", "purge", "acme", "--yes")
        assert again.returncode == 0, again.stderr
        assert "tenant\t0" in again.stdout
        assert await _counts(js, "globex") == SEEDED
    finally:
        await store.close()
        await nc.close()


def test_purge_rejects_a_wildcard_tenant(nats_server: NatsServer) -> None:
    """A tenant id is a subject token: '*' or '>' would purge every tenant."""
    for bad in ("*", ">", "acme.x"):
        res = sluice_cli(nats_server.url, "tenants", "purge", bad, "--yes")
        assert res.returncode == 2 and "invalid tenant id" in res.stderr
