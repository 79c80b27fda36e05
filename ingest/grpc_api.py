"""The gRPC transport: every IngestService method dispatched to the core.

Unary methods share one wrapper. SendBlast keeps the request's bytes (stored as the
recipients object as they came). SendStream reads messages into batches, makes each batch
durable with one payload object and one publish per tier, and answers it; while a batch is
made durable the next one is read and made durable too, but no more (_IN_FLIGHT): a client
that sends faster than batches become durable is held back by gRPC's flow control instead
of filling memory here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any

import grpc
from google.protobuf.message import Message
from opentelemetry.trace import Span, SpanKind

from ingest.errors import ApiError
from ingest.routes import Rpc, rpcs, snake
from sluice.config import IngestConfig
from sluice.telemetry import extract, rpc_status, tracer
from sluice.v1 import ingest_pb2

__all__ = ["servicer_handler"]

log = logging.getLogger(__name__)

_STATUS_DETAILS_KEY = "grpc-status-details-bin"

Ctx = grpc.aio.ServicerContext[Any, Any]


_SERVICE = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name

_tracer = tracer("ingest")


def _metadata(context: Ctx) -> dict[str, Any]:
    return dict(context.invocation_metadata() or ())


def _auth(metadata: dict[str, Any]) -> str | None:
    auth = metadata.get("authorization")
    return auth if isinstance(auth, str) else None


def _span(rpc: str, metadata: dict[str, Any]) -> AbstractContextManager[Span]:
    """A server span for one call (one batch of a stream), the child of a client's
    traceparent if it sent one. gRPC status codes decide the span status (rpc_status)."""
    return _tracer.start_as_current_span(
        f"{_SERVICE}/{rpc}",
        context=extract(metadata),
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": _SERVICE, "rpc.method": rpc},
        record_exception=False,
        set_status_on_exception=False,
    )


async def _abort(context: Ctx, err: ApiError) -> None:
    trailers: list[tuple[str, str | bytes]] = [
        (_STATUS_DETAILS_KEY, err.status().SerializeToString())
    ]
    if err.retry_after is not None:
        trailers.append(("retry-after", str(max(1, math.ceil(err.retry_after)))))
    await context.abort(err.code, err.message, trailing_metadata=tuple(trailers))


def _unary(core: Any, rpc: Rpc) -> Callable[[Any, Ctx], Awaitable[Message]]:
    method = getattr(core, snake(rpc.name))

    async def handle(request: Any, context: Ctx) -> Message:
        metadata = _metadata(context)
        with _span(rpc.name, metadata) as span:
            try:
                if rpc.name == "SendBlast":
                    raw, parsed = request
                    result: Message = await method(_auth(metadata), parsed, raw_request=raw)
                else:
                    result = await method(_auth(metadata), request)
            except ApiError as err:
                rpc_status(span, err.code.value[0])
                await _abort(context, err)
                raise  # abort raises; this satisfies the type checker
            except Exception as exc:
                span.record_exception(exc)
                rpc_status(span, grpc.StatusCode.UNKNOWN.value[0])
                raise
            rpc_status(span, grpc.StatusCode.OK.value[0])
            return result

    return handle


def _keep_bytes(data: bytes) -> tuple[bytes, ingest_pb2.SendBlastRequest]:
    return data, ingest_pb2.SendBlastRequest.FromString(data)


# Batches of one SendStream call being made durable at once. A batch waits some tens of
# milliseconds for the payload object and the job record to be stored; with one at a time
# the ingest spent most of a stream's time waiting.
_IN_FLIGHT = 2

Numbered = list[tuple[int, ingest_pb2.SendRequest]]


def _answer(numbered: Numbered, results: list[Any]) -> ingest_pb2.SendStreamResponse:
    resp = ingest_pb2.SendStreamResponse()
    for (sequence, _), res in zip(numbered, results, strict=True):
        item = resp.results.add(sequence=sequence)
        if isinstance(res, ApiError):
            item.error.CopyFrom(res.status())
        else:
            item.job_id = res.job_id
            item.message_id = res.message_id
    return resp


def _stream(core: Any, cfg: IngestConfig) -> Callable[[AsyncIterator[Any], Ctx], Any]:
    async def handle(
        requests: AsyncIterator[ingest_pb2.SendStreamRequest], context: Ctx
    ) -> AsyncIterator[ingest_pb2.SendStreamResponse]:
        metadata = _metadata(context)
        try:
            principal = await core.authenticate(_auth(metadata))
        except ApiError as err:
            await _abort(context, err)
            return

        async def durable(numbered: Numbered) -> list[Any]:
            try:
                with _span("SendStream", metadata) as span:
                    results = await core.send_batch(principal, [m for _, m in numbered])
                    span.set_attribute("sluice.messages", len(numbered))
            except Exception:
                # (a bug: send_batch answers every failure it knows as an ApiError) The
                # batch is answered with errors and the stream goes on, so the batch made
                # durable beside it keeps its answers.
                log.exception("SendStream: a batch failed")
                failed = ApiError(
                    grpc.StatusCode.INTERNAL, "INTERNAL", "the batch failed; nothing was accepted"
                )
                return [failed] * len(numbered)
            return list(results)

        it = requests.__aiter__()
        pending: asyncio.Future[Any] | None = None  # the next frame, being read
        # Batches being made durable, answered in the order they came.
        in_flight: deque[tuple[Numbered, asyncio.Future[list[Any]]]] = deque()
        done = False
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not done and pending is None:
                    pending = asyncio.ensure_future(it.__anext__())
                if pending is not None and len(in_flight) < _IN_FLIGHT:
                    # A frame, or the oldest batch made durable (its answer may be what
                    # the client waits for before it sends more).
                    oldest = [in_flight[0][1]] if in_flight else []
                    await asyncio.wait([pending, *oldest], return_when=asyncio.FIRST_COMPLETED)
                elif in_flight:
                    await asyncio.wait([in_flight[0][1]])
                else:
                    break
                while in_flight and in_flight[0][1].done():
                    numbered, task = in_flight.popleft()
                    yield _answer(numbered, task.result())
                if pending is None or not pending.done() or len(in_flight) >= _IN_FLIGHT:
                    continue
                try:
                    batch = [pending.result()]
                except StopAsyncIteration:
                    done, pending = True, None
                    continue
                pending = None
                # Linger briefly to fill the batch.
                size = len(batch[0].messages) or 1
                deadline = loop.time() + cfg.stream_linger
                while size < cfg.stream_batch:
                    nxt = asyncio.ensure_future(it.__anext__())
                    try:
                        frame = await asyncio.wait_for(
                            asyncio.shield(nxt), max(0.0, deadline - loop.time())
                        )
                        batch.append(frame)
                        size += len(frame.messages) or 1
                    except TimeoutError:
                        pending = nxt  # carried into the next batch, never dropped
                        break
                    except StopAsyncIteration:
                        done = True
                        break
                    except BaseException:  # (the call ended: the frame read is not wanted)
                        nxt.cancel()
                        raise
                numbered = [
                    (frame.sequence + i, msg)
                    for frame in batch
                    for i, msg in enumerate(frame.messages or [frame.message])
                ]
                in_flight.append((numbered, asyncio.ensure_future(durable(numbered))))
        finally:
            # (the call ended early: what was not answered was not accepted as far as the
            # client knows, and it sends it again)
            for _, task in in_flight:
                task.cancel()
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending

    return handle


def servicer_handler(core: Any, cfg: IngestConfig) -> grpc.GenericRpcHandler[Any, Any]:
    """A handler for sluice.v1.IngestService backed by `core` (an IngestCore)."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for rpc in rpcs():
        if rpc.name == "SendStream":
            handlers[rpc.name] = grpc.stream_stream_rpc_method_handler(
                _stream(core, cfg),
                request_deserializer=rpc.request_cls.FromString,
                response_serializer=rpc.response_cls.SerializeToString,
            )
            continue
        handlers[rpc.name] = grpc.unary_unary_rpc_method_handler(
            _unary(core, rpc),
            request_deserializer=(
                _keep_bytes if rpc.name == "SendBlast" else rpc.request_cls.FromString
            ),
            response_serializer=rpc.response_cls.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(
        ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name, handlers
    )
