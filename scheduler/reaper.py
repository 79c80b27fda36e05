"""The reaper: pointers JetStream gave up on (MaxDeliver spent) become dead letters.

The server decides: when a MAIL consumer has delivered a message max_deliver times without
an ack (e.g. a deliverer crashed on every attempt), it stops delivering it and publishes a
MAX_DELIVERIES advisory. Advisories are at-most-once, so a stream captures them durably
(`ADVISORIES`); the reaper reads the message by its stream sequence, writes the dead letter
(create-only), publishes a `failed` event, and deletes the message. Because an advisory can
still be missed (or come late), a periodic sweep finds stored messages that no consumer will
deliver again and treats them the same way.
"""

from __future__ import annotations

import asyncio
import json
import logging

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from sluice import names
from sluice.outcomes import publish_dead_letter, publish_event
from sluice.v1 import messages_pb2

__all__ = ["Reaper"]

log = logging.getLogger(__name__)


class Reaper:
    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def ensure_consumer(self) -> None:
        await self._js.add_consumer(
            names.ADVISORIES_STREAM,
            js_api.ConsumerConfig(
                durable_name=names.REAPER_CONSUMER,
                ack_policy=js_api.AckPolicy.EXPLICIT,
                ack_wait=60.0,
            ),
        )

    async def reap(self, stream_seq: int, attempts: int) -> bool:
        """Dead-letter MAIL message stream_seq; False if it is already gone."""
        try:
            raw = await self._js.get_msg(names.MAIL_STREAM, stream_seq)
        except NotFoundError:
            return False
        if raw.subject is None or raw.subject.startswith("sluice.mail.chunks."):
            return False
        pointer = messages_pb2.DeliveryPointer.FromString(raw.data or b"")
        await publish_dead_letter(
            self._js, pointer, messages_pb2.DEAD_LETTER_REASON_MAX_DELIVERIES, attempts
        )
        await publish_event(
            self._js,
            pointer,
            messages_pb2.EVENT_TYPE_FAILED,
            f"evt_{pointer.delivery_id}_failed_max",
            category="max_deliveries",
        )
        try:
            await self._js.delete_msg(names.MAIL_STREAM, stream_seq)
        except NotFoundError:
            pass
        log.warning(
            "dead-lettered delivery=%s after %d deliveries (MaxDeliver)",
            pointer.delivery_id,
            attempts,
        )
        return True

    async def handle(self, msg: Msg) -> None:
        try:
            advisory = json.loads(msg.data)
            if advisory.get("stream") == names.MAIL_STREAM:
                await self.reap(int(advisory["stream_seq"]), int(advisory.get("deliveries", 0)))
            await msg.ack()
        except Exception as exc:
            log.warning("advisory not handled (%r); retrying", exc)
            await msg.nak(delay=5.0)

    async def sweep(self) -> int:
        """Dead-letter messages no consumer will deliver again; returns how many.

        A MAIL message that spent MaxDeliver is neither pending nor awaiting an ack, yet
        still stored. When a consumer has nothing pending and nothing awaiting acks, every
        message left on its subject that it has already delivered is such a message (a
        message published since is beyond `delivered` and is left alone). Stuck messages
        among active ones are found once their queue goes quiet.
        """
        reaped = 0
        for info in await self._js.consumers_info(names.MAIL_STREAM):
            subject = info.config.filter_subject
            if not subject or info.num_pending or info.num_ack_pending:
                continue
            delivered = info.delivered.stream_seq if info.delivered else 0
            seq = 0
            while True:
                try:
                    raw = await self._js.get_msg(
                        names.MAIL_STREAM, seq + 1, subject=subject, next=True
                    )
                except NotFoundError:
                    break
                if raw.seq is None or raw.seq > delivered:
                    break
                seq = raw.seq
                if await self.reap(seq, info.config.max_deliver or 0):
                    reaped += 1
        return reaped

    async def run(self, stop: asyncio.Event, sweep_interval: float) -> None:
        await self.ensure_consumer()
        sub = await self._js.pull_subscribe_bind(names.REAPER_CONSUMER, names.ADVISORIES_STREAM)
        loop = asyncio.get_running_loop()
        next_sweep = loop.time() + sweep_interval
        while not stop.is_set():
            try:
                msgs = await sub.fetch(16, timeout=0.5)
            except (TimeoutError, NatsTimeoutError):
                msgs = []
            except Exception as exc:
                log.warning("reaper fetch failed: %r", exc)
                await asyncio.sleep(1.0)
                msgs = []
            for msg in msgs:
                await self.handle(msg)
            if loop.time() >= next_sweep:
                next_sweep = loop.time() + sweep_interval
                try:
                    if n := await self.sweep():
                        log.warning("sweep dead-lettered %d messages an advisory missed", n)
                except Exception as exc:
                    log.warning("sweep failed: %r", exc)
