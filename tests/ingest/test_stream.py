"""SendStream: batched acknowledgements in request order, per-message errors, delivery."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from sluice import names
from sluice.nats_layout import connect
from sluice.v1 import ingest_pb2, ingest_pb2_grpc, messages_pb2
from tests.conftest import Stack, wait_for


def _message(i: int, ok: bool = True) -> ingest_pb2.SendStreamRequest:
    msg = ingest_pb2.SendRequest(
        to=[messages_pb2.Address(email=f"s{i}@mail.test" if ok else "not-an-address")],
        subject=f"stream {i}",
        text="hi",
    )
    getattr(msg, "from").email = "app@acme.test"
    return ingest_pb2.SendStreamRequest(sequence=i, message=msg)


async def test_stream_acks_in_batches_and_delivers(stack: Stack) -> None:
    n = 300
    bad = {17, 250}

    async def requests() -> AsyncIterator[ingest_pb2.SendStreamRequest]:
        for i in range(n):
            yield _message(i, ok=i not in bad)

    async with grpc.aio.insecure_channel(stack.cfg.ingest.grpc_listen) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        call = stub.SendStream(requests(), metadata=(("authorization", f"Bearer {stack.api_key}"),))
        responses = [r async for r in call]
    results = [res for resp in responses for res in resp.results]
    assert [r.sequence for r in results] == list(range(n))
    assert len(responses) < n, "results should come back in batches"
    for r in results:
        if r.sequence in bad:
            assert r.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert not r.job_id
        else:
            assert not r.HasField("error") and r.job_id and r.message_id
    assert len({r.job_id for r in results if r.job_id}) == n - len(bad)
    await wait_for(lambda: len(stack.smtp.received) == n - len(bad), 60, "all streamed mail")
    subjects = sorted(r.message["Subject"] for r in stack.smtp.received)
    assert subjects == sorted(f"stream {i}" for i in range(n) if i not in bad)
    # One `accepted` event per message (the expander publishes a batch's events together).
    nc = await connect(stack.cfg, "test")
    try:
        info = await nc.jetstream().stream_info(
            names.EVENTS_STREAM, subjects_filter="sluice.events.acme.accepted.>"
        )
    finally:
        await nc.close()
    accepted = info.state.subjects or {}
    want = {f"sluice.events.acme.accepted.{r.job_id}.job" for r in results if r.job_id}
    assert set(accepted) == want
    assert set(accepted.values()) == {1}


async def test_stream_with_bad_key_is_refused(stack: Stack) -> None:
    async def requests() -> AsyncIterator[ingest_pb2.SendStreamRequest]:
        yield _message(0)

    async with grpc.aio.insecure_channel(stack.cfg.ingest.grpc_listen) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        call = stub.SendStream(requests(), metadata=(("authorization", "Bearer sk_bad_bad"),))
        try:
            async for _ in call:
                raise AssertionError("a bad key got results")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
        else:
            raise AssertionError("expected UNAUTHENTICATED")


async def test_a_client_that_waits_for_each_answer_gets_it(stack: Stack) -> None:
    """Batches are made durable two at a time, but an answer never waits for the next
    batch: a client that sends one message and waits for its answer before the next (a
    window of one) goes on, message by message."""
    queue: asyncio.Queue[ingest_pb2.SendStreamRequest | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[ingest_pb2.SendStreamRequest]:
        while (req := await queue.get()) is not None:
            yield req

    async with grpc.aio.insecure_channel(stack.cfg.ingest.grpc_listen) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        call = stub.SendStream(requests(), metadata=(("authorization", f"Bearer {stack.api_key}"),))
        answered = []
        for i in range(3):
            await queue.put(_message(i))
            resp = await asyncio.wait_for(call.read(), 10)
            assert isinstance(resp, ingest_pb2.SendStreamResponse), resp
            answered += [(r.sequence, bool(r.job_id)) for r in resp.results]
        await queue.put(None)
        end = await call.read()  # (grpc.aio.EOF: the call is over)
        assert not isinstance(end, ingest_pb2.SendStreamResponse), end
    assert answered == [(0, True), (1, True), (2, True)]
    await wait_for(lambda: len(stack.smtp.received) == 3, 30, "the three messages")
