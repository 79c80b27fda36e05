"""The SendStream handler's batching, below the NATS seam (a stand-in for IngestCore that
records what it made durable): two batches are made durable at once and answered in
order, a stream that ends with two in flight answers both, and a batch whose
`send_batch` fails with a bug is answered with errors while the batch beside it, made
durable, keeps its answers. (The end-to-end stream, with NATS: test_stream.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from ingest.grpc_api import _stream
from sluice.config import IngestConfig
from sluice.v1 import ingest_pb2


def _frame(i: int) -> ingest_pb2.SendStreamRequest:
    return ingest_pb2.SendStreamRequest(sequence=i, message=ingest_pb2.SendRequest(subject=f"m{i}"))


class _Context:
    def invocation_metadata(self) -> tuple[()]:
        return ()


class _Core:
    """Makes a batch durable after `delays[first subject]` seconds, or fails it."""

    def __init__(self, delays: dict[str, float], fail: str = "") -> None:
        self.delays, self.fail = delays, fail
        self.durable: list[list[str]] = []
        self.in_flight = self.most_in_flight = 0

    async def authenticate(self, _: Any) -> tuple[str, None]:
        return ("principal", None)

    async def send_batch(self, _: Any, reqs: list[ingest_pb2.SendRequest]) -> list[Any]:
        subjects = [r.subject for r in reqs]
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delays.get(subjects[0], 0.01))
            if subjects[0] == self.fail:
                raise RuntimeError("a bug")
            self.durable.append(subjects)
            return [
                ingest_pb2.SendResponse(job_id=f"job_{s}", message_id=f"id_{s}") for s in subjects
            ]
        finally:
            self.in_flight -= 1


async def _run(core: _Core, frames: list[int], gap: float = 0.03) -> list[list[str]]:
    """Send the frames `gap` apart, end the stream; the answers' job ids (or error
    reasons), answer by answer."""
    queue: asyncio.Queue[ingest_pb2.SendStreamRequest | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[ingest_pb2.SendStreamRequest]:
        while (req := await queue.get()) is not None:
            yield req

    handle = _stream(core, IngestConfig())(requests(), _Context())  # type: ignore[arg-type]

    async def answers() -> list[list[str]]:
        out = []
        async for resp in handle:
            out.append([r.job_id or f"{r.error.code} {r.error.message}" for r in resp.results])
        return out

    reading = asyncio.ensure_future(answers())
    for i in frames:
        await queue.put(_frame(i))
        await asyncio.sleep(gap)
    await queue.put(None)
    return await asyncio.wait_for(reading, 10)


async def test_two_batches_at_once_answered_in_order() -> None:
    core = _Core({"m1": 0.3})  # the first is slow, the second quick
    answers = await _run(core, [1, 2, 3])
    assert answers == [["job_m1"], ["job_m2"], ["job_m3"]]
    assert core.most_in_flight == 2
    assert core.durable[0] == ["m2"], "the second batch was made durable beside the first"


async def test_a_batch_that_fails_leaves_the_other_its_answers() -> None:
    core = _Core({"m1": 0.3}, fail="m1")
    answers = await _run(core, [1, 2])
    assert core.durable == [["m2"]]
    assert answers[1] == ["job_m2"], "the batch made durable is answered"
    code, message = answers[0][0].split(" ", 1)
    assert int(code) == grpc.StatusCode.INTERNAL.value[0]
    assert "nothing was accepted" in message
