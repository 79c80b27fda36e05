"""The gRPC transport: a generic handler dispatching every IngestService method to the core."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import Message

from ingest.errors import ApiError
from ingest.routes import Rpc, rpcs, snake
from sluice.v1 import ingest_pb2

__all__ = ["servicer_handler"]

_STATUS_DETAILS_KEY = "grpc-status-details-bin"


Ctx = grpc.aio.ServicerContext[Any, Any]


def _unary(core: Any, rpc: Rpc) -> Callable[[Message, Ctx], Awaitable[Message]]:
    method = getattr(core, snake(rpc.name))

    async def handle(request: Message, context: Ctx) -> Message:
        auth = dict(context.invocation_metadata() or ()).get("authorization")
        try:
            result: Message = await method(auth if isinstance(auth, str) else None, request)
            return result
        except ApiError as err:
            await context.abort(
                err.code,
                err.message,
                trailing_metadata=((_STATUS_DETAILS_KEY, err.status().SerializeToString()),),
            )
            raise  # abort raises; this satisfies the type checker

    return handle


def servicer_handler(core: Any) -> grpc.GenericRpcHandler[Any, Any]:
    """A handler for sluice.v1.IngestService backed by `core` (an IngestCore)."""
    handlers = {
        rpc.name: grpc.unary_unary_rpc_method_handler(
            _unary(core, rpc),
            request_deserializer=rpc.request_cls.FromString,
            response_serializer=rpc.response_cls.SerializeToString,
        )
        for rpc in rpcs()
    }
    return grpc.method_handlers_generic_handler(
        ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name, handlers
    )
