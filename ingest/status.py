"""Message and job status, read from the events the other components emit.

Events are published on sluice.events.<tenant>.<type>.<job_id>.<index> (index "job" for
job-level events), so a message's history and a job's counts are subject-filtered reads of
the EVENTS stream; the tenant token makes another tenant's ids simply not found (404).
Before the expander has taken a job, the job is still on sluice.jobs.<tier>.<batch_id>.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TypeAlias

import grpc
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from ingest.errors import ApiError
from sluice import names
from sluice.v1 import ingest_pb2, messages_pb2

__all__ = ["StatusReader"]

_ID = re.compile(r"^(job_[0-9a-f]{24}(?:_\d+)?)(?:\.(\d+))?$")

State: TypeAlias = ingest_pb2.MessageState.ValueType

_STATE: dict[messages_pb2.EventType.ValueType, State] = {
    messages_pb2.EVENT_TYPE_DELIVERED: ingest_pb2.MESSAGE_STATE_DELIVERED,
    messages_pb2.EVENT_TYPE_DEFERRED: ingest_pb2.MESSAGE_STATE_DEFERRED,
    messages_pb2.EVENT_TYPE_BOUNCED: ingest_pb2.MESSAGE_STATE_BOUNCED,
    messages_pb2.EVENT_TYPE_FAILED: ingest_pb2.MESSAGE_STATE_FAILED,
    messages_pb2.EVENT_TYPE_SUPPRESSED: ingest_pb2.MESSAGE_STATE_SUPPRESSED,
}
_FINAL = {
    ingest_pb2.MESSAGE_STATE_DELIVERED,
    ingest_pb2.MESSAGE_STATE_BOUNCED,
    ingest_pb2.MESSAGE_STATE_FAILED,
    ingest_pb2.MESSAGE_STATE_SUPPRESSED,
}


def not_found(what: str) -> ApiError:
    return ApiError(grpc.StatusCode.NOT_FOUND, "NOT_FOUND", f"{what} not found")


def _batch_id(job_id: str) -> str:
    return job_id.split("_", 2)[0] + "_" + job_id.split("_", 2)[1]


class StatusReader:
    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def events(self, filter_subject: str) -> list[messages_pb2.Event]:
        """All events on a subject filter, oldest first."""
        config = js_api.ConsumerConfig(
            ack_policy=js_api.AckPolicy.NONE,
            deliver_policy=js_api.DeliverPolicy.ALL,
            inactive_threshold=30.0,
            mem_storage=True,
            num_replicas=1,
        )
        sub = await self._js.pull_subscribe(
            filter_subject, stream=names.EVENTS_STREAM, config=config
        )
        try:
            info = await sub.consumer_info()
            remaining = info.num_pending or 0
            out: list[messages_pb2.Event] = []
            while remaining > 0:
                msgs = await sub.fetch(min(1000, remaining), timeout=5.0)
                out.extend(messages_pb2.Event.FromString(m.data) for m in msgs)
                remaining -= len(msgs)
            return out
        finally:
            await sub.unsubscribe()
            try:
                await self._js.delete_consumer(names.EVENTS_STREAM, info.name)
            except Exception:  # inactive_threshold removes it anyway
                pass

    async def pending_job(self, tenant_id: str, job_id: str) -> messages_pb2.JobRecord | None:
        """The job's record while it still waits for the expander."""
        base = _batch_id(job_id)
        candidates = [base] if base == job_id else [f"{base}_t{t}" for t in names.TIERS]
        for tier in names.TIERS:
            for batch_id in candidates:
                try:
                    raw = await self._js.get_last_msg(
                        names.JOBS_STREAM, names.job_subject(tier, batch_id)
                    )
                except NotFoundError:
                    continue
                batch = messages_pb2.JobBatch.FromString(raw.data or b"")
                for job in batch.jobs:
                    if job.job_id == job_id and job.tenant_id == tenant_id:
                        return job
        return None

    async def message(self, tenant_id: str, message_id: str) -> ingest_pb2.GetMessageResponse:
        local = message_id.rpartition("@")[0]
        m = _ID.match(local)
        if m is None:
            raise not_found("message")
        job_id, index = m.group(1), m.group(2)
        events = await self.events(
            f"sluice.events.{tenant_id}.*.{job_id}.{index if index is not None else '*'}"
        )
        if index is not None:
            accepted = await self.events(f"sluice.events.{tenant_id}.accepted.{job_id}.job")
        else:
            accepted = [e for e in events if e.type == messages_pb2.EVENT_TYPE_ACCEPTED]
        recipients: dict[str, State] = {}
        if accepted and index is None:
            for email in accepted[0].recipients:
                recipients[email] = ingest_pb2.MESSAGE_STATE_QUEUED
        elif not events and not accepted:
            job = await self.pending_job(tenant_id, job_id)
            if job is None:
                raise not_found("message")
            for rcpt in job.recipients:
                recipients[rcpt.email] = ingest_pb2.MESSAGE_STATE_QUEUED
        for e in events:
            if e.recipient and e.type in _STATE:
                recipients[e.recipient] = _STATE[e.type]
            elif e.recipient:
                recipients.setdefault(e.recipient, ingest_pb2.MESSAGE_STATE_QUEUED)
        states = list(recipients.values()) or [ingest_pb2.MESSAGE_STATE_QUEUED]
        return ingest_pb2.GetMessageResponse(
            message_id=message_id,
            job_id=job_id,
            state=_overall(states),
            recipients=[
                ingest_pb2.RecipientStatus(recipient=r, state=s) for r, s in recipients.items()
            ],
            events=[e for e in events if e.type != messages_pb2.EVENT_TYPE_ACCEPTED],
        )

    async def job(self, tenant_id: str, job_id: str) -> ingest_pb2.GetJobResponse:
        if _ID.match(job_id) is None or "." in job_id:
            raise not_found("job")
        events = await self.events(f"sluice.events.{tenant_id}.*.{job_id}.*")
        accepted = [e for e in events if e.type == messages_pb2.EVENT_TYPE_ACCEPTED]
        resp = ingest_pb2.GetJobResponse(job_id=job_id)
        if accepted:
            resp.tier = accepted[0].tier
            resp.recipient_count = accepted[0].recipient_count
            resp.accepted_at.CopyFrom(accepted[0].timestamp)
        else:
            job = await self.pending_job(tenant_id, job_id)
            if job is None:
                raise not_found("job")
            resp.tier = job.tier
            resp.recipient_count = job.recipient_count or len(job.recipients)
            resp.accepted_at.CopyFrom(job.accepted_at)
        latest: dict[str, State] = {}
        for e in events:
            if e.type in _STATE:
                latest[e.recipient] = _STATE[e.type]
        counts = _count(latest.values())
        resp.delivered = counts[ingest_pb2.MESSAGE_STATE_DELIVERED]
        resp.deferred = counts[ingest_pb2.MESSAGE_STATE_DEFERRED]
        resp.bounced = counts[ingest_pb2.MESSAGE_STATE_BOUNCED]
        resp.failed = counts[ingest_pb2.MESSAGE_STATE_FAILED]
        resp.suppressed = counts[ingest_pb2.MESSAGE_STATE_SUPPRESSED]
        resp.queued = max(0, resp.recipient_count - len(latest))
        return resp


def _count(states: Iterable[State]) -> dict[State, int]:
    out: dict[State, int] = dict.fromkeys(ingest_pb2.MessageState.values(), 0)
    for s in states:
        out[s] += 1
    return out


def _overall(states: list[State]) -> State:
    if ingest_pb2.MESSAGE_STATE_DEFERRED in states:
        return ingest_pb2.MESSAGE_STATE_DEFERRED
    if any(s not in _FINAL for s in states):
        return ingest_pb2.MESSAGE_STATE_QUEUED
    return states[-1]
