"""Reading a KV bucket's current keys completely, and an in-memory copy kept current.

nats-py's `KeyValue.watch()` signals "all current values delivered" (its first `None`) by
comparing the consumer's pending count with the messages its callback has handled, so a
value still in flight is missed: `keys()` and a filtered watch can come back short
(nats-io/nats.py#842; seen here as a listed suppression that was not there). So Sluice reads
current values through a pull consumer of its own: nothing reaches the client before it
fetches, so the pending count taken at creation is exactly what there is to read. The copy
then follows the bucket's changes from the stream sequence its snapshot started at.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api

__all__ = ["KvMirror", "kv_current"]

log = logging.getLogger(__name__)

# How long a fetch waits for values counted at the start that may since have gone (a
# per-message TTL, a newer revision replacing one, a purge): the read ends then.
_VANISHED_WAIT = 1.0
_FETCH_BATCH = 1024


def _removal(msg: Msg) -> bool:
    """A delete or purge marker (a client's KV-Operation, or the server's TTL marker)."""
    headers = msg.headers or {}
    return headers.get("KV-Operation") in ("DEL", "PURGE") or "Nats-Marker-Reason" in headers


async def kv_current(
    js: JetStreamContext, bucket: str, pattern: str = ">", keys_only: bool = False
) -> dict[str, bytes]:
    """The live keys of `bucket` matching the subject pattern, with their values (b"" with
    `keys_only`): every key present when the call began, and perhaps some written since."""
    stream, prefix = f"KV_{bucket}", f"$KV.{bucket}."
    config = js_api.ConsumerConfig(
        deliver_policy=js_api.DeliverPolicy.LAST_PER_SUBJECT,
        ack_policy=js_api.AckPolicy.NONE,
        headers_only=keys_only,
        mem_storage=True,
        num_replicas=1,
        inactive_threshold=60.0,
    )
    sub = await js.pull_subscribe(prefix + pattern, stream=stream, config=config)
    values: dict[str, bytes] = {}
    name = ""
    try:
        info = await sub.consumer_info()
        name, left = info.name, info.num_pending or 0
        while left > 0:
            try:
                msgs = await sub.fetch(min(left, _FETCH_BATCH), timeout=_VANISHED_WAIT)
            except TimeoutError:
                break  # what is left was removed after the count
            left -= len(msgs)
            for msg in msgs:
                key = msg.subject[len(prefix) :]
                if _removal(msg):
                    values.pop(key, None)
                else:
                    values[key] = b"" if keys_only else msg.data
    finally:
        await sub.unsubscribe()
        if name:
            with contextlib.suppress(Exception):  # it lapses by inactive_threshold anyway
                await js.delete_consumer(stream, name)
    return values


class KvMirror:
    """Every key of a bucket and its value, in memory (readers on hot paths check it without
    broker round trips): a complete snapshot, then the changes after it."""

    def __init__(self, js: JetStreamContext, bucket: str) -> None:
        self._js = js
        self._bucket = bucket
        self.values: dict[str, bytes] = {}
        self.ready = asyncio.Event()
        self._sub: JetStreamContext.PushSubscription | None = None

    async def start(self) -> None:
        """Load the bucket's current values, then follow its changes."""
        stream, prefix = f"KV_{self._bucket}", f"$KV.{self._bucket}."
        # Changes after `last` are replayed on top of the snapshot: a value the snapshot
        # already has is written again, in order, so the copy ends up current either way.
        last = (await self._js.stream_info(stream)).state.last_seq
        self.values.update(await kv_current(self._js, self._bucket))

        async def apply(msg: Msg) -> None:
            key = msg.subject[len(prefix) :]
            if _removal(msg):
                self.values.pop(key, None)
            else:
                self.values[key] = msg.data or b""

        self._sub = await self._js.subscribe(
            prefix + ">",
            stream=stream,
            cb=apply,
            ordered_consumer=True,
            config=js_api.ConsumerConfig(
                deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=last + 1
            ),
            inactive_threshold=300.0,
        )
        self.ready.set()

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
