"""JetStream atomic batch publish (server 2.12+, streams with allow_atomic), which nats-py
2.16 has no API for.

Protocol (ADR-50, checked against nats-server 2.15.1): every message carries Nats-Batch-Id
and Nats-Batch-Sequence (1..n); the first is a request (an empty reply means the batch is
open), the middle ones are plain publishes, the last is a request with Nats-Batch-Commit: 1
whose reply is a PubAck for the whole batch, or an error after which nothing was stored. At
most 1000 messages per batch; a batch idle for 10 s is abandoned by the server.
Error codes worth knowing: 10071 a Nats-Expected-Last-Subject-Sequence did not hold, 10201 a
duplicate Nats-Msg-Id, 10210 too many batches in flight on the stream.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence

from nats.aio.client import Client as NatsClient
from nats.js import api as js_api
from nats.js.errors import APIError

__all__ = ["MAX_BATCH", "publish_atomic"]

MAX_BATCH = 1000

Msg = tuple[str, bytes, dict[str, str] | None]


async def publish_atomic(
    nc: NatsClient,
    msgs: Sequence[Msg],
    timeout: float = 5.0,  # noqa: ASYNC109 - per request, like nats-py's own publish
) -> js_api.PubAck:
    """Store all of msgs or none of them; raises nats.js.errors.APIError on refusal."""
    n = len(msgs)
    if not 1 <= n <= MAX_BATCH:
        raise ValueError(f"an atomic batch holds 1..{MAX_BATCH} messages, not {n}")
    batch_id = secrets.token_hex(16)
    for i, (subject, data, headers) in enumerate(msgs, 1):
        h = dict(headers or {})
        h["Nats-Batch-Id"] = batch_id
        h["Nats-Batch-Sequence"] = str(i)
        if i == n:
            h["Nats-Batch-Commit"] = "1"
            reply = await nc.request(subject, data, timeout=timeout, headers=h)
            resp = json.loads(reply.data)
            if "error" in resp:
                raise APIError.from_error(resp["error"])
            return js_api.PubAck.from_response(resp)
        if i == 1:
            reply = await nc.request(subject, data, timeout=timeout, headers=h)
            if reply.data:
                resp = json.loads(reply.data)
                if "error" in resp:
                    raise APIError.from_error(resp["error"])
                # A plain PubAck: the server stored the message without batching (it does
                # not support atomic batches, or the stream does not allow them).
                raise APIError(description="atomic batch publish not supported by the server")
        else:
            await nc.publish(subject, data, headers=h)
    raise AssertionError("unreachable")  # pragma: no cover
