"""RPC dispatch shared by both transports, and HTTP routes read from google.api.http.

Routes are built from the descriptors at start-up (no hand-kept table): every IngestService
method with an http option becomes a route calling the same core method as gRPC does.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from google.api import annotations_pb2, http_pb2
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from sluice.v1 import ingest_pb2

__all__ = ["ACCEPTED", "HttpRoute", "Rpc", "http_routes", "rpcs"]

SERVICE = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"]

# Methods that enqueue work answer HTTP 202 Accepted rather than 200.
ACCEPTED = frozenset({"Send", "SendBlast"})

Handler = Callable[[str | None, Message], Awaitable[Message]]


@dataclass(frozen=True)
class Rpc:
    name: str
    request_cls: type[Message]
    response_cls: type[Message]
    method: MethodDescriptor


@dataclass(frozen=True)
class HttpRoute:
    rpc: Rpc
    verb: str
    # aiohttp path pattern: "/v1/messages/{message_id}".
    path: str
    # "*", a field name, or "" (no body).
    body: str


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def rpcs() -> list[Rpc]:
    return [
        Rpc(m.name, GetMessageClass(m.input_type), GetMessageClass(m.output_type), m)
        for m in SERVICE.methods
    ]


def _rule_route(rpc: Rpc, rule: http_pb2.HttpRule) -> HttpRoute | None:
    pattern = rule.WhichOneof("pattern")
    if pattern is None or pattern == "custom":
        return None
    template: str = getattr(rule, pattern)
    # {name=messages/*} style segments are reduced to a plain {name} variable.
    path = re.sub(r"\{([a-z_.]+)(=[^}]*)?\}", lambda m: "{" + m.group(1) + "}", template)
    return HttpRoute(rpc, pattern.upper(), path, rule.body)


def http_routes() -> list[HttpRoute]:
    routes: list[HttpRoute] = []
    for rpc in rpcs():
        opts = rpc.method.GetOptions()
        if not opts.HasExtension(annotations_pb2.http):
            continue
        rule = opts.Extensions[annotations_pb2.http]
        for r in [rule, *rule.additional_bindings]:
            route = _rule_route(rpc, r)
            if route is not None:
                routes.append(route)
    return routes
