"""The ingest core shared by the gRPC and HTTP transports: authenticate, validate, make the
job durable, answer. No delivery work happens here."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

import grpc
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.errors import APIError as JsApiError
from nats.js.errors import NoStreamResponseError

from ingest.auth import Authenticator, Principal
from ingest.errors import ApiError, bad_request
from ingest.validate import normalise_domain, validate_send
from sluice import names
from sluice.config import Config
from sluice.store import PayloadStore, StoreError
from sluice.tenants import now_ts
from sluice.v1 import ingest_pb2, messages_pb2

__all__ = ["IngestCore", "new_job_id"]

log = logging.getLogger(__name__)

# JetStream error code for a stream at its limits with DiscardNew.
_JS_STREAM_FULL = {10077, 10047}


def new_job_id() -> str:
    """Time-ordered, unique, a valid subject token: "job_" + 12 hex ms + 12 hex random."""
    return f"job_{time.time_ns() // 1_000_000:012x}{secrets.token_hex(6)}"


def unavailable(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.UNAVAILABLE, "NOT_DURABLE", message)


class IngestCore:
    """Accepts sends. Transports call `send` with the Authorization value and the request."""

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

    def _authorize(
        self, principal: Principal, req: ingest_pb2.SendRequest, tier: names.Tier
    ) -> None:
        key, tenant = principal
        allowed = list(key.tiers) or list(tenant.allowed_tiers)
        if allowed and tier not in allowed:
            raise ApiError(
                grpc.StatusCode.PERMISSION_DENIED,
                "TIER_NOT_ALLOWED",
                f"tier {names.tier_token(tier)} is not allowed for this key",
                [("tier", "not allowed for this key")],
            )
        domain = normalise_domain(getattr(req, "from").email.rpartition("@")[2])
        if domain not in tenant.allowed_from_domains:
            raise ApiError(
                grpc.StatusCode.PERMISSION_DENIED,
                "FROM_DOMAIN_NOT_ALLOWED",
                f"this tenant may not send from {domain}",
                [("from.email", f"domain {domain} is not one of the tenant's sending domains")],
            )

    async def send(
        self, authorization: str | None, req: ingest_pb2.SendRequest
    ) -> ingest_pb2.SendResponse:
        principal = await self.authenticate(authorization)
        violations = validate_send(req, self._cfg.ingest)
        if violations:
            raise bad_request(violations)
        tier = req.tier or messages_pb2.TIER_TRANSACTIONAL
        self._authorize(principal, req, tier)
        tenant = principal[1]
        sender = getattr(req, "from")
        job_id = new_job_id()
        from_domain = normalise_domain(sender.email.rpartition("@")[2])
        message_id = f"{job_id}@{from_domain}"
        payload = messages_pb2.Payload(
            reply_to=req.reply_to,
            to=req.to,
            cc=req.cc,
            subject=req.subject,
            text=req.text,
            html=req.html,
            headers=req.headers,
        )
        getattr(payload, "from").CopyFrom(sender)
        recipients = [
            messages_pb2.Recipient(email=a.email, message_id=message_id)
            for a in [*req.to, *req.cc, *req.bcc]
        ]
        job = messages_pb2.JobRecord(
            job_id=job_id,
            tenant_id=tenant.tenant_id,
            tier=tier,
            accepted_at=now_ts(),
            envelope_from=sender.email,
            recipients=recipients,
            tags=req.tags,
            metadata=req.metadata,
        )
        await self._make_durable(job, payload)
        log.info(
            "accepted job=%s tenant=%s tier=%s recipients=%d",
            job_id,
            tenant.tenant_id,
            names.tier_token(tier),
            len(recipients),
        )
        return ingest_pb2.SendResponse(job_id=job_id, message_id=message_id)

    async def _make_durable(
        self, job: messages_pb2.JobRecord, payload: messages_pb2.Payload
    ) -> None:
        """Payload first, then the job record; only a JetStream ack of both means 202."""
        if not self._nc.is_connected:
            raise unavailable("the queue is unreachable; nothing was accepted")
        timeout = self._cfg.ingest.publish_timeout
        try:
            async with asyncio.timeout(timeout):
                job.payload_ref = await self._store.put(job.job_id, payload.SerializeToString())
            await self._js.publish(
                names.job_subject(job.tier),
                job.SerializeToString(),
                timeout=timeout,
                stream=names.JOBS_STREAM,
                headers={"Nats-Msg-Id": job.job_id},
            )
        except JsApiError as exc:
            if exc.err_code in _JS_STREAM_FULL:
                raise ApiError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "BACKLOG_FULL",
                    "the backlog is full; retry later",
                ) from exc
            raise unavailable(f"the queue refused the job: {exc.description}") from exc
        except (TimeoutError, NoStreamResponseError, StoreError, OSError) as exc:
            raise unavailable("the job could not be made durable; nothing was accepted") from exc
        except Exception as exc:  # nats-py raises its own connection errors
            log.warning("publish failed: %r", exc)
            raise unavailable("the job could not be made durable; nothing was accepted") from exc
