"""The ingest core shared by the gRPC and HTTP transports: authenticate, validate, make the
job durable, answer. No delivery work happens here.

Durable means: the payload object (and a blast's recipients object) stored, then the
JobBatch published and acknowledged by JetStream. Only then does a caller get its answer.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import orjson
from google.protobuf.message import Message
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.errors import APIError as JsApiError
from nats.js.errors import NoStreamResponseError
from opentelemetry import trace

from ingest.auth import Authenticator, Principal
from ingest.errors import ApiError, bad_request
from ingest.idempotency import Claim, IdempotencyStore, fingerprint
from ingest.ratelimit import RateLimiter
from ingest.status import StatusReader
from ingest.validate import (
    MAX_SUBSTITUTION,
    all_valid,
    check_address,
    check_blast_recipient,
    normalise_domain,
    validate_blast_content,
    validate_send,
)
from sluice import deadletters, names, suppressions
from sluice.config import Config
from sluice.store import PayloadStore, StoreError
from sluice.telemetry import count_accepted, inject
from sluice.v1 import ingest_pb2, messages_pb2

__all__ = ["IngestCore", "new_job_id"]

log = logging.getLogger(__name__)

# JetStream error codes for a stream at its limits with DiscardNew.
_JS_STREAM_FULL = {10077, 10047, 10027}

R = TypeVar("R", bound=Message)

_RECIPIENT_KEYS = frozenset({"email", "name", "substitutions"})


def new_job_id() -> str:
    """Time-ordered, unique, a valid subject token: "job_" + 12 hex ms + 12 hex random."""
    return f"job_{time.time_ns() // 1_000_000:012x}{secrets.token_hex(6)}"


def _single(job: messages_pb2.JobRecord) -> messages_pb2.JobBatch:
    return messages_pb2.JobBatch(batch_id=job.job_id, jobs=[job])


def unavailable(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.UNAVAILABLE, "NOT_DURABLE", message, retry_after=1.0)


def _from_domain(req: Any) -> str:
    return normalise_domain(getattr(req, "from").email.rpartition("@")[2])


class IngestCore:
    """Accepts mail. Transports call these methods with the Authorization value."""

    def __init__(
        self,
        cfg: Config,
        nc: NatsClient,
        js: JetStreamContext,
        store: PayloadStore,
        auth: Authenticator,
    ) -> None:
        self._cfg = cfg
        self._nc = nc
        self._js = js
        self._store = store
        self._auth = auth
        self._limiter = RateLimiter()
        self._status = StatusReader(js)
        self._idem = IdempotencyStore(
            js, cfg.ingest.idempotency_ttl, cfg.ingest.publish_timeout * 3
        )

    # -- shared steps ---------------------------------------------------------------------

    async def authenticate(self, authorization: str | None) -> Principal:
        if not self._nc.is_connected:
            raise unavailable("the queue is unreachable; nothing was accepted")
        try:
            return await self._auth.authenticate(authorization)
        except ApiError:
            raise
        except Exception as exc:
            log.warning("key lookup failed: %r", exc)
            raise unavailable("cannot check the API key right now; retry") from exc

    def rate_limit(self, principal: Principal, cost: float = 1.0) -> None:
        tenant = principal[1]
        wait = self._limiter.acquire(tenant.tenant_id, float(tenant.rate_limit), cost)
        if wait > 0:
            raise ApiError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "RATE_LIMITED",
                f"tenant rate limit of {tenant.rate_limit} requests/s exceeded",
                retry_after=wait,
            )

    def _authorize(self, principal: Principal, req: Any, tier: names.Tier) -> None:
        key, tenant = principal
        allowed = list(key.tiers) or list(tenant.allowed_tiers)
        if allowed and tier not in allowed:
            raise ApiError(
                grpc.StatusCode.PERMISSION_DENIED,
                "TIER_NOT_ALLOWED",
                f"tier {names.tier_token(tier)} is not allowed for this key",
                [("tier", "not allowed for this key")],
            )
        domain = _from_domain(req)
        if domain not in tenant.allowed_from_domains:
            raise ApiError(
                grpc.StatusCode.PERMISSION_DENIED,
                "FROM_DOMAIN_NOT_ALLOWED",
                f"this tenant may not send from {domain}",
                [("from.email", f"domain {domain} is not one of the tenant's sending domains")],
            )

    async def _idempotent(
        self,
        principal: Principal,
        method: str,
        req: Any,
        response_cls: type[R],
        run: Callable[[], Awaitable[R]],
        extra: bytes = b"",
    ) -> R:
        """run() once per (tenant, request_id); repeats get the first response."""
        if not req.request_id:
            return await run()
        if len(req.request_id) > 256:
            raise bad_request([("request_id", "at most 256 characters")])
        try:
            claimed = await self._idem.claim(
                principal[1].tenant_id,
                req.request_id,
                fingerprint(method, req, extra),
                response_cls,
            )
        except ApiError:
            raise
        except Exception as exc:
            raise unavailable("cannot check the idempotency key right now; retry") from exc
        if not isinstance(claimed, Claim):
            assert isinstance(claimed, response_cls)
            return claimed
        try:
            response = await run()
        except BaseException:
            await claimed.release()
            raise
        try:
            await claimed.complete(response)
        except Exception as exc:  # the job is durable; a retry inside 24 h may duplicate it
            log.warning("idempotency record for %s not stored: %r", claimed.key, exc)
        return response

    async def _publish(self, batch: messages_pb2.JobBatch, tier: names.Tier) -> None:
        # The request's span travels with the job record (the expander continues the trace).
        await self._js.publish(
            names.job_subject(tier, batch.batch_id),
            batch.SerializeToString(),
            timeout=self._cfg.ingest.publish_timeout,
            stream=names.JOBS_STREAM,
            headers=inject({"Nats-Msg-Id": batch.batch_id}),
        )
        count_accepted(tier, sum(job.recipient_count or len(job.recipients) for job in batch.jobs))
        span = trace.get_current_span()
        if span.is_recording() and len(batch.jobs) == 1:
            span.set_attribute("sluice.job_id", batch.jobs[0].job_id)

    async def _durable(self, *steps: Callable[[], Awaitable[object]]) -> None:
        """Run the steps in order; any failure means nothing was accepted (503/429)."""
        if not self._nc.is_connected:
            raise unavailable("the queue is unreachable; nothing was accepted")
        try:
            for step in steps:
                async with asyncio.timeout(self._cfg.ingest.publish_timeout):
                    await step()
        except JsApiError as exc:
            if exc.err_code in _JS_STREAM_FULL:
                raise ApiError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "BACKLOG_FULL",
                    "the backlog is full; retry later",
                    retry_after=5.0,
                ) from exc
            raise unavailable(f"the queue refused the job: {exc.description}") from exc
        except (TimeoutError, NoStreamResponseError, StoreError, OSError) as exc:
            raise unavailable("the job could not be made durable; nothing was accepted") from exc
        except ApiError:
            raise
        except Exception as exc:  # nats-py raises its own connection errors
            log.warning("publish failed: %r", exc)
            raise unavailable("the job could not be made durable; nothing was accepted") from exc

    def _job(
        self, tenant_id: str, req: Any, tier: names.Tier, job_id: str
    ) -> messages_pb2.JobRecord:
        # (only the fields given: protobuf copies every argument, empty lists and maps too)
        job = messages_pb2.JobRecord(
            job_id=job_id,
            tenant_id=tenant_id,
            tier=tier,
            envelope_from=getattr(req, "from").email,
        )
        job.accepted_at.FromNanoseconds(time.time_ns())
        if req.tags:
            job.tags.extend(req.tags)
        if req.metadata:
            job.metadata.update(req.metadata)
        if req.HasField("send_at"):
            job.send_at.CopyFrom(req.send_at)
        return job

    @staticmethod
    def _payload(req: Any, payload: messages_pb2.Payload | None = None) -> messages_pb2.Payload:
        """The request's content as a Payload, built in `payload` if given (a batch's
        payloads are built in place: appending one copies it)."""
        if payload is None:
            payload = messages_pb2.Payload()
        payload.subject = req.subject
        payload.text = req.text
        payload.html = req.html
        getattr(payload, "from").CopyFrom(getattr(req, "from"))
        if req.reply_to:
            payload.reply_to.extend(req.reply_to)
        if req.headers:
            payload.headers.update(req.headers)
        if req.attachments:
            payload.attachments.extend(req.attachments)
        if isinstance(req, ingest_pb2.SendRequest):
            if req.to:
                payload.to.extend(req.to)
            if req.cc:
                payload.cc.extend(req.cc)
        return payload

    def _prepare_send(
        self,
        principal: Principal,
        req: ingest_pb2.SendRequest,
        job_id: str,
        payloads: messages_pb2.PayloadBatch | None = None,
    ) -> tuple[messages_pb2.JobRecord, messages_pb2.Payload, ingest_pb2.SendResponse]:
        """A valid, authorised request's job, payload and response (its payload built as the
        last of `payloads` if given); ApiError otherwise, with nothing added to `payloads`."""
        violations = validate_send(req, self._cfg.ingest)
        if violations:
            raise bad_request(violations)
        tier = req.tier or messages_pb2.TIER_TRANSACTIONAL
        self._authorize(principal, req, tier)
        message_id = f"{job_id}@{_from_domain(req)}"
        job = self._job(principal[1].tenant_id, req, tier, job_id)
        for a in [*req.to, *req.cc, *req.bcc]:
            job.recipients.add(email=a.email, message_id=message_id)
        payload = self._payload(req, None if payloads is None else payloads.payloads.add())
        return job, payload, ingest_pb2.SendResponse(job_id=job_id, message_id=message_id)

    # -- Send ---------------------------------------------------------------------------

    async def send(
        self, authorization: str | None, req: ingest_pb2.SendRequest
    ) -> ingest_pb2.SendResponse:
        principal = await self.authenticate(authorization)
        self.rate_limit(principal)

        async def run() -> ingest_pb2.SendResponse:
            job_id = new_job_id()
            job, payload, response = self._prepare_send(principal, req, job_id)

            async def put() -> None:
                job.payload_ref = await self._store.put(job_id, payload.SerializeToString())

            # Protobuf copies on assignment: build the batch after the payload_ref is set.
            await self._durable(put, lambda: self._publish(_single(job), job.tier))
            log.info(
                "accepted job=%s tenant=%s tier=%s recipients=%d",
                job_id,
                job.tenant_id,
                names.tier_token(job.tier),
                len(job.recipients),
            )
            return response

        return await self._idempotent(principal, "Send", req, ingest_pb2.SendResponse, run)

    # -- SendStream (a batch of Sends) --------------------------------------------------

    async def send_batch(
        self, principal: Principal, reqs: list[ingest_pb2.SendRequest]
    ) -> list[ingest_pb2.SendResponse | ApiError]:
        """Accept many messages with one payload object and one publish per tier."""
        batch_id = new_job_id()
        results: list[ingest_pb2.SendResponse | ApiError] = []
        payloads = messages_pb2.PayloadBatch()
        jobs: list[messages_pb2.JobRecord] = []
        for i, req in enumerate(reqs):
            if req.request_id:
                results.append(
                    ApiError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "INVALID_REQUEST",
                        "request_id is not supported on streamed messages; the stream's "
                        "sequence numbers identify them",
                        [("message.request_id", "not supported")],
                    )
                )
                continue
            try:
                self.rate_limit(principal)
                job, _, response = self._prepare_send(principal, req, f"{batch_id}_{i}", payloads)
            except ApiError as err:
                results.append(err)
                continue
            job.payload_ref = f"#{len(payloads.payloads) - 1}"
            jobs.append(job)
            results.append(response)
        if not jobs:
            return results

        async def put() -> None:
            ref = await self._store.put(batch_id, payloads.SerializeToString())
            for job in jobs:
                job.payload_ref = ref + job.payload_ref

        async def publish() -> None:
            # One JobBatch per tier, so the expander can take critical work first.
            by_tier: dict[names.Tier, messages_pb2.JobBatch] = {}
            for job in jobs:
                if job.tier not in by_tier:
                    by_tier[job.tier] = messages_pb2.JobBatch(batch_id=f"{batch_id}_t{job.tier}")
                by_tier[job.tier].jobs.append(job)
            await asyncio.gather(*(self._publish(b, t) for t, b in by_tier.items()))

        try:
            await self._durable(put, publish)
        except ApiError as err:
            return [err if isinstance(r, ingest_pb2.SendResponse) else r for r in results]
        log.info("accepted stream batch=%s messages=%d", batch_id, len(jobs))
        return results

    # -- status ---------------------------------------------------------------------------

    async def get_message(
        self, authorization: str | None, req: ingest_pb2.GetMessageRequest
    ) -> ingest_pb2.GetMessageResponse:
        principal = await self.authenticate(authorization)
        return await self._status.message(principal[1].tenant_id, req.message_id)

    async def get_job(
        self, authorization: str | None, req: ingest_pb2.GetJobRequest
    ) -> ingest_pb2.GetJobResponse:
        principal = await self.authenticate(authorization)
        return await self._status.job(principal[1].tenant_id, req.job_id)

    # -- dead letters -----------------------------------------------------------------------

    async def list_dead_letters(
        self, authorization: str | None, req: ingest_pb2.ListDeadLettersRequest
    ) -> ingest_pb2.ListDeadLettersResponse:
        principal = await self.authenticate(authorization)
        size = min(req.page_size or 100, 1000)
        try:
            after = int(req.page_token) if req.page_token else 0
        except ValueError as exc:
            raise bad_request([("page_token", "is not a token from a previous page")]) from exc
        entries, next_seq = await deadletters.list_page(
            self._js, principal[1].tenant_id, size, after
        )
        return ingest_pb2.ListDeadLettersResponse(
            dead_letters=[
                ingest_pb2.DeadLetterEntry(delivery_id=d, dead_letter=dl) for _, d, dl in entries
            ],
            next_page_token=str(next_seq) if next_seq else "",
        )

    async def replay_dead_letter(
        self, authorization: str | None, req: ingest_pb2.ReplayDeadLetterRequest
    ) -> ingest_pb2.ReplayDeadLetterResponse:
        principal = await self.authenticate(authorization)
        if not re.fullmatch(
            r"[A-Za-z0-9_-]{1,100}", req.delivery_id
        ) or not await deadletters.replay(self._js, principal[1].tenant_id, req.delivery_id):
            raise ApiError(grpc.StatusCode.NOT_FOUND, "NOT_FOUND", "dead letter not found")
        log.info("replayed dead letter %s for tenant %s", req.delivery_id, principal[1].tenant_id)
        return ingest_pb2.ReplayDeadLetterResponse(delivery_id=req.delivery_id)

    # -- suppressions ----------------------------------------------------------------------

    async def list_suppressions(
        self, authorization: str | None, req: ingest_pb2.ListSuppressionsRequest
    ) -> ingest_pb2.ListSuppressionsResponse:
        principal = await self.authenticate(authorization)
        size = min(req.page_size or 100, 1000)
        entries = await suppressions.list_tenant(self._js, principal[1].tenant_id)
        # The page token is the last address of the previous page (entries are ordered).
        after = req.page_token
        if after:
            entries = [e for e in entries if e.email > after]
        page = entries[:size]
        return ingest_pb2.ListSuppressionsResponse(
            suppressions=page,
            next_page_token=page[-1].email if len(entries) > size else "",
        )

    async def add_suppression(
        self, authorization: str | None, req: ingest_pb2.AddSuppressionRequest
    ) -> ingest_pb2.AddSuppressionResponse:
        principal = await self.authenticate(authorization)
        problems: list[tuple[str, str]] = []
        if (problem := check_address(req.email)) is not None:
            problems.append(("email", problem))
        if len(req.reason) > 300:
            problems.append(("reason", "is longer than 300 characters"))
        ttl: float | None = None
        if req.HasField("expires_at"):
            ttl = req.expires_at.ToNanoseconds() / 1e9 - time.time()
            if ttl <= 0:
                problems.append(("expires_at", "must be in the future"))
        if problems:
            raise bad_request(problems)
        entry = await suppressions.put(
            self._js,
            principal[1].tenant_id,
            req.email,
            req.reason or "manual",
            messages_pb2.SUPPRESSION_SOURCE_MANUAL,
            ttl,
        )
        log.info("suppressed %s for tenant %s", entry.email, principal[1].tenant_id)
        return ingest_pb2.AddSuppressionResponse(suppression=entry)

    async def remove_suppression(
        self, authorization: str | None, req: ingest_pb2.RemoveSuppressionRequest
    ) -> ingest_pb2.RemoveSuppressionResponse:
        principal = await self.authenticate(authorization)
        if not await suppressions.remove(self._js, principal[1].tenant_id, req.email):
            raise ApiError(grpc.StatusCode.NOT_FOUND, "NOT_FOUND", "recipient is not suppressed")
        log.info("unsuppressed %s for tenant %s", req.email, principal[1].tenant_id)
        return ingest_pb2.RemoveSuppressionResponse(email=suppressions.normalise(req.email))

    # -- SendBlast ----------------------------------------------------------------------

    async def send_blast(
        self,
        authorization: str | None,
        req: ingest_pb2.SendBlastRequest,
        raw_request: bytes | None = None,
        json_recipients: Any = None,
    ) -> ingest_pb2.SendBlastResponse:
        """A blast. gRPC passes the request's bytes (stored as the recipients object as they
        came); HTTP passes the decoded JSON recipients (stored as JSON). Either way the
        recipients are validated here and travel as one object, never through the broker."""
        principal = await self.authenticate(authorization)
        self.rate_limit(principal)
        recipients_json: list[dict[str, Any]] | None = None
        if json_recipients is not None:
            recipients_json = self._check_json_recipients(json_recipients)
            count = len(recipients_json)
        else:
            count = len(req.recipients)
            self._check_proto_recipients(req)

        async def run() -> ingest_pb2.SendBlastResponse:
            violations = validate_blast_content(req, self._cfg.ingest)
            if violations:
                raise bad_request(violations)
            tier = req.tier or messages_pb2.TIER_BULK
            self._authorize(principal, req, tier)
            job_id = new_job_id()
            job = self._job(principal[1].tenant_id, req, tier, job_id)
            job.recipient_count = count
            payload = self._payload(req)
            if recipients_json is not None:
                rcpt_bytes = orjson.dumps(recipients_json)
                job.recipients_format = messages_pb2.RECIPIENTS_FORMAT_JSON
            else:
                rcpt_bytes = (
                    raw_request
                    if raw_request is not None
                    else (
                        messages_pb2.BlastRecipients(recipients=req.recipients).SerializeToString()
                    )
                )
                job.recipients_format = messages_pb2.RECIPIENTS_FORMAT_PROTO

            async def put_payload() -> None:
                job.payload_ref = await self._store.put(job_id, payload.SerializeToString())

            async def put_recipients() -> None:
                job.recipients_ref = await self._store.put(f"{job_id}.recipients", rcpt_bytes)

            await self._durable(
                put_payload, put_recipients, lambda: self._publish(_single(job), tier)
            )
            domain = _from_domain(req)
            log.info("accepted blast job=%s tenant=%s recipients=%d", job_id, job.tenant_id, count)
            return ingest_pb2.SendBlastResponse(
                job_id=job_id,
                recipient_count=count,
                message_ids=[f"{job_id}.{i}@{domain}" for i in range(count)],
            )

        # The fingerprint must cover the recipients; JSON ones are not inside req.
        extra = orjson.dumps(recipients_json) if recipients_json is not None else b""
        return await self._idempotent(
            principal, "SendBlast", req, ingest_pb2.SendBlastResponse, run, extra
        )

    def _count_ok(self, count: int) -> None:
        limit = self._cfg.ingest.max_blast_recipients
        if count == 0:
            raise bad_request([("recipients", "at least one recipient is required")])
        if count > limit:
            raise bad_request([("recipients", f"{count} recipients; at most {limit}")])

    def _check_json_recipients(self, data: Any) -> list[dict[str, Any]]:
        if not isinstance(data, list):
            raise bad_request([("recipients", "must be a JSON array")])
        self._count_ok(len(data))
        try:
            if (
                all(type(r) is dict and r.keys() <= _RECIPIENT_KEYS for r in data)
                and all(type(r.get("substitutions", {})) is dict for r in data)
                and all_valid(
                    [r["email"] for r in data],
                    [r["name"] for r in data if r.get("name")],
                    [v for r in data if "substitutions" in r for v in r["substitutions"].values()],
                )
            ):
                return data
        except KeyError:
            pass  # a recipient without email: the item-by-item pass names it
        out: list[tuple[str, str]] = []
        allowed = {"email", "name", "substitutions"}
        for i, r in enumerate(data):
            if not isinstance(r, dict):
                out.append((f"recipients[{i}]", "must be a JSON object"))
                continue
            if len(r) > 3 or not allowed.issuperset(r):
                for k in r:
                    if k not in allowed:
                        out.append((f"recipients[{i}].{k}", "unknown field"))
            check_blast_recipient(i, r.get("email"), r.get("name"), r.get("substitutions"), out)
            if len(out) >= 100:
                break
        if out:
            raise bad_request(out)
        return data

    def _check_proto_recipients(self, req: ingest_pb2.SendBlastRequest) -> None:
        self._count_ok(len(req.recipients))
        recipients = req.recipients
        # Reading proto maps is slow; a recipient whose whole encoding is within the value
        # limit cannot hold a value over it, so only larger ones have their values read.
        big = [r for r in recipients if r.ByteSize() > MAX_SUBSTITUTION]
        if all_valid(
            [r.email for r in recipients],
            [r.name for r in recipients if r.name],
            [v for r in big for v in r.substitutions.values()],
        ):
            return
        out: list[tuple[str, str]] = []
        for i, r in enumerate(req.recipients):
            check_blast_recipient(i, r.email, r.name, r.substitutions, out)
            if len(out) >= 100:
                break
        if out:
            raise bad_request(out)
