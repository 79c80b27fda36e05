"""SIGTERM under load: each service runs as its own `sluice <service>` process, is stopped in
the middle of its work, exits 0 within a bound, and once it is started again nothing it had
accepted is lost or done twice where it must be done once.

The deliverer's case (transactions in hand finished, the rest handed back, every message
exactly once) is tests/scheduler/test_failures.py::test_sigterm_drains_without_loss_or_duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import sys
from collections import Counter
from typing import Any

import aiohttp
import pytest

from sluice import names
from sluice.config import Config
from sluice.natsserver import free_ports
from tests.api import blast, stream_messages
from tests.conftest import Stack, wait_for

# A hang detector, not a performance bound: the drain itself is bounded by
# [shutdown] drain_timeout (20 s by default).
EXIT_BOUND = 60.0


def env_of(cfg: Config) -> dict[str, str]:
    """SLUICE_<SECTION>__<KEY> variables for every setting of cfg that is not the default,
    so a process started with them runs with the test's configuration."""
    env: dict[str, str] = {}
    for section in dataclasses.fields(Config):
        values = getattr(cfg, section.name)
        defaults = type(values)()
        for key in dataclasses.fields(values):
            value = getattr(values, key.name)
            if value == getattr(defaults, key.name):
                continue
            if isinstance(value, tuple):
                text = ",".join(str(v) for v in value)
            elif isinstance(value, bool):
                text = "true" if value else "false"
            else:
                text = str(value)
            env[f"SLUICE_{section.name.upper()}__{key.name.upper()}"] = text
    return env


class Proc:
    """One `sluice <service>` process with its own ops port (its /readyz says when it runs)."""

    def __init__(self, cfg: Config, name: str) -> None:
        self.name = name
        (ops,) = free_ports(1)
        self.ops = f"127.0.0.1:{ops}"
        self.env = dict(os.environ, **env_of(cfg), SLUICE_TELEMETRY__OPS_LISTEN=self.ops)
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sluice.cli",
            "--log-level",
            "WARNING",
            self.name,
            env=self.env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        await wait_for(self._ready, 60, f"{self.name} ready")

    async def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.returncode is not None:
            raise AssertionError(f"{self.name} exited: {await self._stderr()}")
        try:
            async with (
                aiohttp.ClientSession() as s,
                s.get(f"http://{self.ops}/readyz") as resp,
            ):
                return resp.status == 200
        except aiohttp.ClientConnectionError:
            return False

    async def sigterm(self) -> int:
        """SIGTERM, and the exit status (the process must end within EXIT_BOUND)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.proc.wait(), EXIT_BOUND)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise AssertionError(
                f"{self.name} still running {EXIT_BOUND}s after SIGTERM: {await self._stderr()}"
            ) from None
        assert code == 0, f"{self.name} exited {code}: {await self._stderr()}"
        return code

    async def _stderr(self) -> str:
        assert self.proc is not None and self.proc.stderr is not None
        return (await self.proc.stderr.read()).decode(errors="replace")[-3000:]

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), EXIT_BOUND)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


@pytest.mark.parametrize("stack_services", [("expander", "scheduler", "deliverer", "webhooks")])
async def test_ingest_drains_and_every_202_is_delivered(stack: Stack) -> None:
    ingest = Proc(stack.cfg, "ingest")
    await ingest.start()
    accepted: list[str] = []
    refused = 0
    total = 400  # bounded: at most this many requests
    sent = iter(range(total))

    async def client() -> None:
        nonlocal refused
        async with aiohttp.ClientSession() as s:
            for i in sent:
                rcpt = f"u{i}@mail.test"
                try:
                    async with s.post(
                        f"{stack.http}/v1/send",
                        headers={"Authorization": f"Bearer {stack.api_key}"},
                        json={
                            "from": {"email": "a@acme.test"},
                            "to": [{"email": rcpt}],
                            "subject": "drain",
                            "text": "hi",
                        },
                    ) as resp:
                        if resp.status == 202:
                            accepted.append(rcpt)
                        else:
                            refused += 1
                except aiohttp.ClientError:
                    refused += 1

    try:
        clients = [asyncio.create_task(client()) for _ in range(8)]
        await wait_for(lambda: len(accepted) >= 40, 60, "ingest accepting")
        await ingest.sigterm()
        await asyncio.gather(*clients)
        assert len(accepted) < total, "the stop came too late to prove anything"
        assert refused > 0, "nothing was sent while ingest was stopped"
        await ingest.start()  # started again: it serves as before
        await blast(stack, ["after@mail.test"], tier="transactional")
    finally:
        await ingest.close()
    want = {*accepted, "after@mail.test"}
    await wait_for(
        lambda: want <= {r.rcpt_tos[0] for r in stack.smtp.received}, 90, "every 202 delivered"
    )
    counts = Counter(r.rcpt_tos[0] for r in stack.smtp.received)
    assert all(counts[r] == 1 for r in want), "an accepted message was delivered twice"


@pytest.mark.parametrize("stack_services", [("ingest",)])
async def test_expander_drains_and_every_job_is_expanded_exactly_once(stack: Stack) -> None:
    # No deliverer: the pointers stay in MAIL, where they can be counted exactly.
    jobs, per_job = 10, 5000
    for j in range(jobs):
        await blast(stack, [f"j{j}r{i}@mail.test" for i in range(per_job)])
    expander = Proc(stack.cfg, "expander")
    try:
        await expander.start()
        await wait_for(
            lambda: _more_than(stream_messages(stack, names.MAIL_STREAM), 0),
            60,
            "expansion under way",
        )
        await expander.sigterm()
        mail = await stream_messages(stack, names.MAIL_STREAM)
        assert await stream_messages(stack, names.JOBS_STREAM) > 0 or mail < jobs * per_job, (
            "the stop came too late to prove anything"
        )
        await expander.start()
        await wait_for(
            lambda: _equal(stream_messages(stack, names.JOBS_STREAM), 0), 120, "every job expanded"
        )
    finally:
        await expander.close()
    # Markers are purged once a job is done, so MAIL holds exactly the pointers.
    assert await stream_messages(stack, names.MAIL_STREAM) == jobs * per_job


@pytest.mark.parametrize("stack_services", [("ingest", "expander", "scheduler", "deliverer")])
async def test_webhooks_drain_and_every_event_is_posted(stack: Stack) -> None:
    n = 150
    stack.smtp.data_delay["mail.test"] = 0.03  # events arrive over a few seconds
    webhooks = Proc(stack.cfg, "webhooks")
    try:
        await webhooks.start()
        emails = [f"w{i}@mail.test" for i in range(n)]
        await blast(stack, emails, tier="transactional")
        await wait_for(lambda: len(_delivered(stack)) >= 20, 60, "webhooks under way")
        await webhooks.sigterm()
        assert len(_delivered(stack)) < n, "the stop came too late to prove anything"
        await webhooks.start()
        await wait_for(lambda: _delivered(stack) >= set(emails), 120, "every event posted")
    finally:
        await webhooks.close()
    assert _delivered(stack) == set(emails)


def _delivered(stack: Stack) -> set[str]:
    return {
        c.verified["data"]["recipient"]
        for c in stack.hooks.of_type("message.delivered")
        if c.verified is not None
    }


@pytest.mark.parametrize("stack_services", [("ingest", "expander", "deliverer", "webhooks")])
async def test_scheduler_restarts_and_deliverers_carry_on(stack: Stack) -> None:
    n = 200
    stack.smtp.data_delay["mail.test"] = 0.02
    scheduler = Proc(stack.cfg, "scheduler")
    try:
        await scheduler.start()
        emails = [f"s{i}@mail.test" for i in range(n)]
        await blast(stack, emails)
        await wait_for(lambda: len(stack.smtp.received) >= 20, 60, "delivery under way")
        await scheduler.sigterm()
        assert len({r.rcpt_tos[0] for r in stack.smtp.received}) < n, (
            "the stop came too late to prove anything"
        )
        await scheduler.start()
        await wait_for(
            lambda: {r.rcpt_tos[0] for r in stack.smtp.received} >= set(emails),
            120,
            "the rest delivered after the restart",
        )
    finally:
        await scheduler.close()
    counts = Counter(r.rcpt_tos[0] for r in stack.smtp.received)
    # The deliverer keeps its connections through the restart (its lease ends at expiry when
    # unrenewable), so nothing should be delivered twice.
    assert set(counts) == set(emails) and max(counts.values()) == 1, counts.most_common(3)


async def _more_than(count: Any, n: int) -> bool:
    return bool(await count > n)


async def _equal(count: Any, n: int) -> bool:
    with contextlib.suppress(Exception):
        return bool(await count == n)
    return False
