"""What is written to NATS when a pointer's fate is known: its events and its dead letter.

Used by the deliverer (delivered, deferred, bounced, horizon passed) and by the scheduler's
reaper (MaxDeliver spent), so both write the same records the same way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import APIError as JsApiError
from nats.js.errors import NoStreamResponseError

from sluice import names
from sluice.telemetry import count_event, inject
from sluice.tenants import now_ts
from sluice.v1 import messages_pb2

__all__ = [
    "WRONG_LAST_SEQUENCE",
    "BatchPublisher",
    "count_published",
    "event_message",
    "publish_create_only",
    "publish_dead_letter",
    "publish_event",
]

log = logging.getLogger(__name__)

# JetStream: "wrong last sequence" — a create-only publish found its subject taken.
WRONG_LAST_SEQUENCE = 10071
# A publish to a stream: the stream it must be stored in, and the status of a reply that
# says no stream took it.
_EXPECTED_STREAM = "Nats-Expected-Stream"
_NO_RESPONDERS = "503"


def event_message(
    p: messages_pb2.DeliveryPointer,
    event_type: messages_pb2.EventType.ValueType,
    event_id: str,
    reply: messages_pb2.SmtpReply | None = None,
    category: str = "",
    mx_host: str = "",
) -> tuple[str, bytes, dict[str, str]]:
    """The (subject, data, headers) of one event about p; event_id also deduplicates it
    (Nats-Msg-Id). The headers carry the current trace context (the webhook POST continues
    it). Whoever publishes it counts it once it is stored (count_published)."""
    event = messages_pb2.Event(
        event_id=event_id,
        type=event_type,
        tenant_id=p.tenant_id,
        job_id=p.job_id,
        message_id=p.message_id,
        recipient=p.recipient,
        tier=p.tier,
        timestamp=now_ts(),
        bounce_category=category,
        mx_host=mx_host,
        smtp_reply=reply,
    )
    return (
        names.event_subject(p.tenant_id, event_type, p.job_id, p.index),
        event.SerializeToString(),
        inject({"Nats-Msg-Id": event.event_id}),
    )


async def publish_event(
    js: JetStreamContext,
    p: messages_pb2.DeliveryPointer,
    event_type: messages_pb2.EventType.ValueType,
    event_id: str,
    reply: messages_pb2.SmtpReply | None = None,
    category: str = "",
    mx_host: str = "",
) -> None:
    """Publish one event about p (see event_message)."""
    subject, data, headers = event_message(p, event_type, event_id, reply, category, mx_host)
    await js.publish(subject, data, stream=names.EVENTS_STREAM, headers=headers)
    count_published(p, event_type)


def count_published(
    p: messages_pb2.DeliveryPointer, event_type: messages_pb2.EventType.ValueType
) -> None:
    """Count (metrics) an event about p that is stored: after its publish, so that a
    publish tried again is counted once."""
    latency = None
    if event_type == messages_pb2.EVENT_TYPE_DELIVERED:
        latency = time.time() - p.accepted_at.ToNanoseconds() / 1e9
    count_event(event_type, p.tier, latency)


_Pending = tuple[str, bytes, dict[str, str], "asyncio.Future[None]"]


class BatchPublisher:
    """Publishes to one stream in batches: what concurrent callers publish while a batch is
    in flight goes out together as the next one. `publish` returns once its message is
    stored.

    A batch is published message by message without waiting for each other's PubAcks, to
    an inbox of its own (see _store_each). Not as a JetStream atomic batch: nats-server
    stages each atomic batch in a file store of its own (a directory and files created and
    removed): in batches of 100 it cost nats-server 24-31 µs of CPU per message against
    8-13 for these publishes, the client 9-10 against 14-16, and twice the time
    (bench/events_publish.py, 2026-11-29); in one profile of bench.compare the staging was
    30 % of nats-server's CPU. A repeated Nats-Msg-Id is deduplicated per message, as
    usual.

    With a `window` (seconds), a batch waits that long for company before it goes: the
    deliverer's transactions end one by one (each when its server answers), and their
    events, sent as they came, took a NATS write each, and so did the acks that follow
    their PubAcks (nats-py writes once per turn of the event loop)."""

    def __init__(
        self,
        nc: NatsClient,
        stream: str,
        max_batch: int = 256,
        timeout: float = 5.0,  # for each PubAck
        window: float = 0.0,
    ) -> None:
        self._nc = nc
        self._stream = stream
        self._max = max_batch
        self._timeout = timeout
        self._window = window
        self._pending: list[_Pending] = []
        self._task: asyncio.Task[None] | None = None
        self._inbox: str | None = None  # (subscribed at the first plain publish)
        self._acks: dict[str, asyncio.Future[None]] = {}
        self._seq = 0

    async def publish(self, subject: str, data: bytes, headers: dict[str, str]) -> None:
        await self.publish_many([(subject, data, headers)])

    async def publish_many(self, msgs: list[tuple[str, bytes, dict[str, str]]]) -> None:
        """Publish each of msgs (as if by `publish`, without a task per message); returns
        once all are stored, or raises the first failure once all are settled."""
        loop = asyncio.get_running_loop()
        waits: list[asyncio.Future[None]] = []
        for subject, data, headers in msgs:
            done: asyncio.Future[None] = loop.create_future()
            self._pending.append((subject, data, headers, done))
            waits.append(done)
        if not waits:
            return
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        if len(waits) == 1:
            await waits[0]
            return
        await asyncio.wait(waits)
        for done in waits:
            if (error := done.exception()) is not None:
                raise error

    async def _run(self) -> None:
        try:
            if self._window:
                await asyncio.sleep(self._window)
            while self._pending:
                batch, self._pending = self._pending[: self._max], self._pending[self._max :]
                await self._send(batch)
        finally:
            self._task = None

    async def _send(self, batch: list[_Pending]) -> None:
        try:
            await self._store_each(batch)
        except BaseException as exc:  # the connection, or this task cancelled
            for *_, done in batch:
                if not done.done():
                    done.set_exception(
                        exc if isinstance(exc, Exception) else ConnectionError("publisher stopped")
                    )
            if not isinstance(exc, Exception):
                raise

    async def _store_each(self, batch: list[_Pending]) -> None:
        """Publish each message of `batch` without waiting for the PubAck of the one before,
        then wait for their PubAcks, `timeout` at most (a PubAck never seen is a failed
        publish: the caller's pointer comes back).

        The PubAcks come to an inbox of this publisher's own, and a successful one is not
        parsed: nats-py's publish_async (a semaphore, a token from os.urandom and a parsed
        PubAck per message) took a third more of the client's CPU per message."""
        inbox = await self._ack_inbox()
        loop = asyncio.get_running_loop()
        acks: list[tuple[str, asyncio.Future[None]]] = []
        try:
            for subject, data, headers, _ in batch:
                self._seq += 1
                reply = f"{inbox}.{self._seq}"
                ack: asyncio.Future[None] = loop.create_future()
                self._acks[reply] = ack
                acks.append((reply, ack))
                headers[_EXPECTED_STREAM] = self._stream
                await self._nc.publish(subject, data, reply=reply, headers=headers)
            await asyncio.wait([ack for _, ack in acks], timeout=self._timeout)
        finally:
            for reply, _ in acks:
                self._acks.pop(reply, None)
        for (_, ack), (*_, done) in zip(acks, batch, strict=True):
            error: BaseException | None
            if not ack.done():
                ack.cancel()
                error = TimeoutError(f"no PubAck from {self._stream} within {self._timeout:g} s")
            else:
                error = ack.exception()
            if done.done():
                continue
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

    async def _ack_inbox(self) -> str:
        if self._inbox is None:
            inbox = self._nc.new_inbox()
            await self._nc.subscribe(f"{inbox}.*", cb=self._on_ack)
            self._inbox = inbox
        return self._inbox

    async def _on_ack(self, msg: Msg) -> None:
        ack = self._acks.pop(msg.subject, None)
        if ack is None or ack.done():
            return
        if msg.headers and msg.headers.get("Status") == _NO_RESPONDERS:
            ack.set_exception(NoStreamResponseError())
        elif b'"error"' in msg.data:  # (a PubAck names the stream and the sequence only)
            ack.set_exception(_refusal(msg.data))
        else:
            ack.set_result(None)


def _refusal(data: bytes) -> JsApiError:
    """The error of a PubAck that refuses a message. (nats-py's APIError.from_error raises
    it rather than returning it: its publish_async then left the future unresolved.)"""
    try:
        JsApiError.from_error(json.loads(data)["error"])
    except JsApiError as exc:
        return exc
    except (ValueError, KeyError, TypeError):
        pass
    return JsApiError(description=data.decode(errors="replace"))


async def publish_dead_letter(
    js: JetStreamContext,
    p: messages_pb2.DeliveryPointer,
    reason: messages_pb2.DeadLetterReason.ValueType,
    attempts: int,
    reply: messages_pb2.SmtpReply | None = None,
) -> None:
    """Write the dead letter create-only; a repeat (after a crash) is not a duplicate."""
    record = messages_pb2.DeadLetter(
        pointer=p,
        reason=reason,
        last_reply=reply,
        dead_at=now_ts(),
        attempts=attempts,
    )
    subject = names.dlq_subject(p.tenant_id, p.delivery_id)
    if not await publish_create_only(js, subject, record.SerializeToString(), names.DLQ_STREAM):
        log.info("dead letter for %s already written", p.delivery_id)


async def publish_create_only(js: JetStreamContext, subject: str, data: bytes, stream: str) -> bool:
    """Publish to a subject that must hold one message; False if it already does (a repeat
    after a crash is then not a duplicate)."""
    try:
        await js.publish(
            subject, data, stream=stream, headers={"Nats-Expected-Last-Subject-Sequence": "0"}
        )
    except JsApiError as exc:
        if exc.err_code != WRONG_LAST_SEQUENCE:
            raise
        return False
    return True
