"""Runs a deliverer process."""

from __future__ import annotations

import asyncio
import logging

from deliverer.schedclient import SchedulerClient
from deliverer.worker import Deliverer
from sluice import names
from sluice.config import Config
from sluice.health import ServiceHealth, nats_problems
from sluice.nats_layout import connect, ensure_layout
from sluice.outcomes import BatchPublisher
from sluice.resolver import Resolver
from sluice.store import open_store

__all__ = ["serve"]

log = logging.getLogger(__name__)

# Seconds an event waits for others to go out with (BatchPublisher's window). In the shaping
# benchmark (a server answering each transaction as it comes) the deliverers made a sixth
# fewer socket writes with it, and nats-server spent a fifth less CPU.
_EVENT_WINDOW = 0.005


async def serve(cfg: Config, stop: asyncio.Event) -> None:
    nc = await connect(cfg, "sluice-deliverer")
    js = nc.jetstream()
    await ensure_layout(js, cfg)
    # The deliverer caches parsed payloads itself (one read per blast or batch).
    store = open_store(cfg.store, js, cfg.nats.replicas)
    # One address, or several (standby schedulers): calls fail over to the active one.
    async with SchedulerClient.from_config(cfg.deliverer) as scheduler:
        # Events of transactions ending within a few milliseconds of each other go out
        # together, and so do their acks (see BatchPublisher).
        events = BatchPublisher(nc, names.EVENTS_STREAM, window=_EVENT_WINDOW)
        deliverer = Deliverer(cfg, js, store, Resolver(cfg.dns), scheduler, events)
        log.info("deliverer %s: scheduler at %s", deliverer.deliverer_id, cfg.deliverer.scheduler)
        health = ServiceHealth("deliverer", lambda: nats_problems(nc))
        try:
            await health.start(cfg.telemetry, stop)
            await deliverer.run(stop)
        finally:
            await health.close()
            await store.close()
            await nc.close()
