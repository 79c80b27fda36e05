"""The expander survives SIGKILL at any moment: after restarts (also with two expanders
side by side) every recipient of a blast has exactly one pointer in MAIL, none missing and
none duplicated; suppressed recipients get a `suppressed` event instead of a pointer. A
blast is queued grouped by domain, and a batch begun in job order is finished that way."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from nats.js import api as js_api

from ingest.expander import CHUNK, Expander
from sluice import names, suppressions
from sluice.lanes import Lanes
from sluice.nats_layout import connect
from sluice.store import open_store
from sluice.suppressions import Suppressions
from sluice.v1 import messages_pb2
from tests.api import call
from tests.conftest import Stack, wait_for

RECIPIENTS = 12_000


@pytest.fixture
def stack_services() -> tuple[str, ...]:
    return ("ingest",)  # the expander runs as a process the test kills


@pytest.fixture
def stack_overrides() -> dict[str, dict[str, Any]]:
    return {"ingest": {"max_blast_recipients": RECIPIENTS}}


def _blast(run: int) -> dict[str, Any]:
    return {
        "from": {"email": "news@acme.test"},
        "subject": "run {{n}}",
        "text": "hello",
        "recipients": [
            {"email": f"r{run}x{i}@d{i % 97}.test", "substitutions": {"n": str(i)}}
            for i in range(RECIPIENTS)
        ],
    }


_started: list[asyncio.subprocess.Process] = []


@pytest.fixture(autouse=True)
async def _no_stray_expanders() -> Any:
    yield
    for proc in _started:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    _started.clear()


async def _start_expander(stack: Stack, tmp: Path) -> asyncio.subprocess.Process:
    # A short ack_wait: the batch a killed expander held comes back within 2 s.
    env = dict(os.environ, SLUICE_NATS__URL=stack.cfg.nats.url, SLUICE_EXPANDER__ACK_WAIT="2s")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sluice.cli",
        "--log-level",
        "WARNING",
        "expander",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    _started.append(proc)
    return proc


async def _pointers(stack: Stack, job_id: str) -> Counter[str]:
    """delivery_id -> how many pointers MAIL holds for it."""
    return Counter(p.delivery_id for p in await _queued(stack, job_id))


async def _queued(stack: Stack, job_id: str) -> list[messages_pb2.DeliveryPointer]:
    """The job's pointers in MAIL, in stream order (read without consuming: a work-queue
    stream needs explicit acks, so nothing is acked and the consumer is deleted)."""
    nc = await connect(stack.cfg, "test-read")
    js = nc.jetstream()
    sub = await js.pull_subscribe(
        "sluice.mail.bulk.>",
        stream=names.MAIL_STREAM,
        config=js_api.ConsumerConfig(
            ack_policy=js_api.AckPolicy.EXPLICIT,
            max_ack_pending=1_000_000,
            ack_wait=300,
            inactive_threshold=10,
        ),
    )
    queued: list[tuple[int, messages_pb2.DeliveryPointer]] = []
    try:
        pending = (await sub.consumer_info()).num_pending or 0
        while pending > 0:
            msgs = await sub.fetch(min(1000, pending), timeout=5)
            pending -= len(msgs)
            for m in msgs:
                p = messages_pb2.DeliveryPointer.FromString(m.data)
                if p.job_id == job_id:
                    queued.append((m.metadata.sequence.stream, p))
    finally:
        name = (await sub.consumer_info()).name
        await sub.unsubscribe()
        await js.delete_consumer(names.MAIL_STREAM, name)
        await nc.close()
    return [p for _, p in sorted(queued, key=lambda sp: sp[0])]


async def _expand_with_a_process(stack: Stack, tmp_path: Path) -> None:
    proc = await _start_expander(stack, tmp_path)
    try:
        await wait_for(lambda: _jobs_left_zero(stack), 60, "job expanded")
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()


async def test_a_blast_is_queued_grouped_by_domain(stack: Stack, tmp_path: Path) -> None:
    """Recipients that take turns over 97 domains are queued domain after domain (in job
    order within each), so a deliverer fetches a domain's mail together."""
    blast = _blast(0)
    blast["recipients"] = blast["recipients"][:3000]
    status, body, _ = await call(stack, "POST", "/v1/blasts", blast)
    assert status == 202, body
    await _expand_with_a_process(stack, tmp_path)
    queued = await _queued(stack, body["job_id"])
    assert len(queued) == 3000
    runs = 1 + sum(a.domain != b.domain for a, b in itertools.pairwise(queued))
    # Each chunk is stored whole (chunks in any order): a run per domain, plus at most one
    # more per chunk boundary. In job order there would be 3000 runs.
    assert runs <= 97 + (-(-3000 // 999) - 1), runs
    for domain in {p.domain for p in queued}:
        indexes = [p.index for p in queued if p.domain == domain]
        assert indexes == sorted(indexes), domain


async def test_a_batch_begun_in_job_order_is_finished_in_job_order(
    stack: Stack, tmp_path: Path
) -> None:
    """An expander from before grouping committed chunk 0 of a batch in job order (a marker
    without the g): the batch is finished in job order, so every recipient is queued once."""
    blast = _blast(1)
    blast["recipients"] = blast["recipients"][:1500]
    status, body, _ = await call(stack, "POST", "/v1/blasts", blast)
    assert status == 202, body
    nc = await connect(stack.cfg, "test-old-expander")
    try:
        js = nc.jetstream()
        raw = await js.get_msg(names.JOBS_STREAM, 1)
        batch = messages_pb2.JobBatch.FromString(raw.data or b"")
        old = Expander(
            stack.cfg,
            nc,
            js,
            open_store(stack.cfg.store, js, 1),
            Suppressions(js),
            Lanes(js, stack.cfg.expander.buckets, stack.cfg.expander.dedicated_ttl),
        )
        items = [item for job in batch.jobs for item in await old._items(job)]
        assert await old._commit_chunk(batch.batch_id, 0, items[:CHUNK], frozenset(), False)
    finally:
        await nc.close()
    assert await _chunks_in(stack, body["job_id"]) == 1
    await _expand_with_a_process(stack, tmp_path)
    counts = await _pointers(stack, body["job_id"])
    assert len(counts) == 1500 and set(counts.values()) == {1}


async def _jobs_left(stack: Stack) -> int:
    nc = await connect(stack.cfg, "test")
    try:
        return int((await nc.jetstream().stream_info(names.JOBS_STREAM)).state.messages)
    finally:
        await nc.close()


@pytest.mark.timeout(300)
async def test_sigkill_at_random_moments_never_loses_or_duplicates(
    stack: Stack, tmp_path: Path
) -> None:
    rng = random.Random(20261128)
    chunks = -(-RECIPIENTS // 999)
    partial: list[bool] = []
    for run in range(5):
        status, body, _ = await call(stack, "POST", "/v1/blasts", _blast(run))
        assert status == 202, body
        job_id = body["job_id"]
        kills = 0
        # Kill one to three times at a random moment after the expansion has begun, then
        # let one (or, in the last run, two side by side) finish the job.
        for _ in range(rng.randint(1, 3)):
            proc = await _start_expander(stack, tmp_path)
            before = await _chunks_in(stack, job_id)
            await wait_for(
                lambda j=job_id, b=before: _chunks_grew(stack, j, b),
                60,
                "expansion to run",
            )
            await asyncio.sleep(rng.uniform(0.0, 0.15))
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            kills += 1
            partial.append(0 < await _chunks_in(stack, job_id) < chunks)
        finishers = [await _start_expander(stack, tmp_path) for _ in range(2 if run == 4 else 1)]
        try:
            await wait_for(lambda: _jobs_left_zero(stack), 120, f"run {run}: job expanded")
        finally:
            for proc in finishers:
                proc.send_signal(signal.SIGTERM)
                await proc.wait()
        counts = await _pointers(stack, job_id)
        assert len(counts) == RECIPIENTS, f"run {run}: {RECIPIENTS - len(counts)} missing"
        dupes = {d: c for d, c in counts.items() if c > 1}
        assert dupes == {}, f"run {run}: duplicated pointers after {kills} kills"
        # Markers are purged once the job is done.
        nc = await connect(stack.cfg, "test")
        info = await nc.jetstream().stream_info(
            names.MAIL_STREAM, subjects_filter=f"sluice.mail.chunks.{job_id}.>"
        )
        await nc.close()
        assert not info.state.subjects
        # Empty MAIL for the next run.
        nc = await connect(stack.cfg, "test")
        await nc.jetstream().purge_stream(names.MAIL_STREAM)
        await nc.close()

    # The kills did land mid-expansion (not all before it began or after it ended).
    assert sum(partial) >= 1, partial


async def _chunks_in(stack: Stack, job_id: str) -> int:
    nc = await connect(stack.cfg, "test")
    try:
        info = await nc.jetstream().stream_info(
            names.MAIL_STREAM, subjects_filter=f"sluice.mail.chunks.{job_id}.>"
        )
        return len(info.state.subjects or {})
    finally:
        await nc.close()


async def _chunks_grew(stack: Stack, job_id: str, before: int) -> bool:
    """The expander made progress (or had nothing left to do)."""
    return await _chunks_in(stack, job_id) > before or await _jobs_left(stack) == 0


async def _jobs_left_zero(stack: Stack) -> bool:
    return await _jobs_left(stack) == 0


async def test_suppressed_recipients_get_an_event_not_a_pointer(
    stack: Stack, tmp_path: Path
) -> None:
    nc = await connect(stack.cfg, "test")
    js = nc.jetstream()
    await suppressions.put(
        js, "acme", "R0X5@D5.test", "hard bounce", messages_pb2.SUPPRESSION_SOURCE_MANUAL
    )
    await nc.close()
    blast = _blast(0)
    blast["recipients"] = blast["recipients"][:20]
    status, body, _ = await call(stack, "POST", "/v1/blasts", blast)
    assert status == 202
    await _expand_with_a_process(stack, tmp_path)
    counts = await _pointers(stack, body["job_id"])
    assert len(counts) == 19 and f"{body['job_id']}-5" not in counts
    nc = await connect(stack.cfg, "test")
    raw = await nc.jetstream().get_last_msg(
        names.EVENTS_STREAM, f"sluice.events.acme.suppressed.{body['job_id']}.5"
    )
    await nc.close()
    event = messages_pb2.Event.FromString(raw.data or b"")
    assert event.recipient == "r0x5@d5.test"
    assert event.message_id == f"{body['job_id']}.5@acme.test"
