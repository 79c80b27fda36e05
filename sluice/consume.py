"""The worker loop shared by the pull consumers that handle messages one by one (the
expander, webhooks): fetch as much as there is room for, handle each in its own task with
at most `limit` in flight, hand a message back with a delay when its handler fails, and on
stop let the messages in hand finish (up to `drain` seconds), then hand back the rest."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext

__all__ = ["consume"]

log = logging.getLogger(__name__)


async def consume(
    sub: JetStreamContext.PullSubscription,
    handle: Callable[[Msg], Awaitable[None]],
    limit: int,
    stop: asyncio.Event,
    name: str,
    retry_delay: float = 5.0,
    drain: float = 10.0,
) -> None:
    tasks: set[asyncio.Task[None]] = set()

    async def one(msg: Msg) -> None:
        try:
            await handle(msg)
        except asyncio.CancelledError:
            # Cut off at the end of a drain: back at once for the next worker (not after
            # ack_wait). Handlers are safe to repeat (the expander's markers, webhook ids).
            with contextlib.suppress(Exception):
                await msg.nak()
            raise
        except Exception:
            log.exception("%s failed; retrying in %gs", name, retry_delay)
            await msg.nak(delay=retry_delay)

    try:
        while not stop.is_set():
            free = limit - len(tasks)
            if free <= 0:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                msgs = await sub.fetch(free, timeout=0.5)
            except (TimeoutError, NatsTimeoutError):
                continue
            except Exception as exc:
                log.warning("%s fetch failed: %r", name, exc)
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                task = asyncio.create_task(one(msg))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
    finally:
        if tasks:
            _, cut = await asyncio.wait(set(tasks), timeout=drain)
            for task in cut:
                task.cancel()
            await asyncio.gather(*cut, return_exceptions=True)
