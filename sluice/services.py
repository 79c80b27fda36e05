"""Running services: signal handling, logging, uvloop. The CLI and `sluice dev` use this."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from sluice.config import Config
from sluice.telemetry import setup_metrics, setup_tracing

__all__ = ["SERVICES", "run_until_signal", "setup_logging", "tune_gc"]

# Container objects allocated (net of those freed) before a young collection; CPython
# 3.11's default is 700. A service allocates and frees thousands of short-lived objects a
# message (protobufs, events, coroutines), almost none of them in cycles, so most
# collections found nothing to free: measured under bench.compare, 5-7 % of a deliverer's
# CPU and 10 % of the expander's went to collections, and none with this threshold.
_GC_YOUNG = 50_000

Serve = Callable[[Config, asyncio.Event], Coroutine[Any, Any, None]]


def _serve(name: str) -> Serve:
    # Imported lazily: the shared package imports no service, except here, the composition root.
    if name == "ingest":
        from ingest.server import serve
    elif name == "expander":
        from ingest.expander import serve
    elif name == "scheduler":
        from scheduler.server import serve
    elif name == "deliverer":
        from deliverer.server import serve
    elif name == "webhooks":
        from webhooks.sender import serve
    else:
        raise ValueError(f"unknown service {name!r}")
    return serve


SERVICES = ("ingest", "expander", "scheduler", "deliverer", "webhooks")


def service(name: str) -> Serve:
    """The serve coroutine of a service, with its telemetry set up."""
    serve = _serve(name)

    async def run(cfg: Config, stop: asyncio.Event) -> None:
        setup_tracing(cfg.telemetry, f"sluice-{name}")
        setup_metrics(cfg.telemetry, f"sluice-{name}")
        await serve(cfg, stop)

    return run


def tune_gc() -> None:
    """Garbage collection for a process that runs services, called once, by the CLI, when
    their modules are imported: what exists then (modules, classes, configuration) lives as
    long as the process, so it is moved out of the collector's sight (gc.freeze) instead of
    being traversed by every full collection, and young collections wait for _GC_YOUNG new
    container objects (net of those freed). Cyclic garbage is still collected, later. (Not
    called by `service`: a process that starts services among other work — the tests — keeps
    its own settings.)"""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(_GC_YOUNG, older, oldest)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiosmtpd").setLevel(logging.WARNING)
    logging.getLogger("mail.log").setLevel(logging.WARNING)


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


def run_until_signal(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run main(stop) on uvloop (if installed); SIGINT/SIGTERM set stop for a clean drain."""

    async def runner() -> None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        await main(stop)

    try:
        import uvloop

        uvloop.run(runner())
    except ImportError:
        asyncio.run(runner())
