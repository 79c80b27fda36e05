"""The backlog per mail queue, read from JetStream, and the consumers that drain it."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from sluice import names
from sluice.config import Config

__all__ = ["Queue", "ensure_consumer", "read_backlog"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Queue:
    tier: names.Tier
    key: str

    @property
    def domain(self) -> str:
        return names.key_domain(self.key)


async def read_backlog(js: JetStreamContext) -> dict[Queue, int]:
    """Messages stored per queue (ready and deferred alike)."""
    info = await js.stream_info(names.MAIL_STREAM, subjects_filter=names.MAIL_SUBJECTS)
    out: dict[Queue, int] = {}
    for subject, count in (info.state.subjects or {}).items():
        parts = subject.split(".")
        if len(parts) != 4 or count <= 0:
            continue
        try:
            out[Queue(names.tier_from_token(parts[2]), parts[3])] = count
        except KeyError:
            continue
    return out


async def ensure_consumer(js: JetStreamContext, cfg: Config, q: Queue) -> str:
    """The durable pull consumer of a queue, created if missing."""
    durable = names.mail_consumer(q.tier, q.key)
    try:
        await js.consumer_info(names.MAIL_STREAM, durable)
    except NotFoundError:
        await js.add_consumer(
            names.MAIL_STREAM,
            js_api.ConsumerConfig(
                durable_name=durable,
                filter_subject=names.mail_subject(q.tier, q.key),
                ack_policy=js_api.AckPolicy.EXPLICIT,
                ack_wait=cfg.deliverer.ack_wait,
                max_deliver=cfg.retry.max_deliver,
                # NAK-delayed messages count against this; keep it far above the ready work.
                max_ack_pending=10_000,
            ),
        )
        log.info("created consumer %s", durable)
    return durable
