"""The HTTP/JSON transport: grpc-gateway-style transcoding of IngestService onto aiohttp.

Routes come from the protos (ingest.routes). A blast's recipients skip the generic JSON to
proto conversion: they are validated as decoded JSON and stored as JSON (the lean path).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import grpc
import orjson
from aiohttp import web
from google.protobuf import json_format
from opentelemetry.trace import SpanKind

from ingest.errors import ApiError, bad_request
from ingest.routes import ACCEPTED, HttpRoute, http_routes, snake
from sluice import jsonpb
from sluice.telemetry import extract, http_status, tracer

__all__ = ["make_app"]

log = logging.getLogger(__name__)
_tracer = tracer("ingest")

IDEMPOTENCY_HEADER = "Idempotency-Key"


def error_response(err: ApiError) -> web.Response:
    body = json_format.MessageToDict(err.status(), preserving_proto_field_name=True)
    headers = {}
    if err.http_status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="sluice"'
    if err.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after)))
    return web.Response(
        body=orjson.dumps(body),
        status=err.http_status,
        headers=headers,
        content_type="application/json",
    )


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "REQUEST_TOO_LARGE",
        f"request body is larger than {max_bytes} bytes",
        [("body", "too large")],
        http_override=413,
    )


async def _decode_body(request: web.Request, route: HttpRoute, max_bytes: int) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > max_bytes:
        raise _too_large(max_bytes)
    raw = await request.read()
    try:
        decoded = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError as exc:
        raise bad_request([("body", f"is not valid JSON: {exc}")]) from exc
    if route.body == "*":
        if not isinstance(decoded, dict):
            raise bad_request([("body", "must be a JSON object")])
        return decoded
    return {route.body: decoded}


def _handler(core: Any, route: HttpRoute, max_bytes: int) -> Any:
    method = getattr(core, snake(route.rpc.name))
    success = 202 if route.rpc.name in ACCEPTED else 200
    is_blast = route.rpc.name == "SendBlast"
    has_request_id = "request_id" in route.rpc.request_cls.DESCRIPTOR.fields_by_name

    async def respond(request: web.Request) -> web.Response:
        try:
            data = await _decode_body(request, route, max_bytes) if route.body else {}
            if route.body != "*":
                # Fields bound neither to the path nor to the body come from the query.
                data.update(request.query)
            data.update(request.match_info)
            extra: dict[str, Any] = {}
            if is_blast:
                extra["json_recipients"] = data.pop("recipients", None)
            try:
                msg: Any = jsonpb.parse(data, route.rpc.request_cls)
            except jsonpb.JsonError as exc:
                raise bad_request(exc.violations) from exc
            key = request.headers.get(IDEMPOTENCY_HEADER)
            if key is not None and has_request_id:
                if msg.request_id and msg.request_id != key:
                    raise bad_request(
                        [("request_id", f"differs from the {IDEMPOTENCY_HEADER} header")]
                    )
                msg.request_id = key
            if is_blast and extra["json_recipients"] is None:
                raise bad_request([("recipients", "at least one recipient is required")])
            result = await method(request.headers.get("Authorization"), msg, **extra)
            return web.Response(
                body=orjson.dumps(jsonpb.to_dict(result)),
                status=success,
                content_type="application/json",
            )
        except ApiError as err:
            return error_response(err)
        except web.HTTPRequestEntityTooLarge:
            return error_response(_too_large(max_bytes))

    # A server span per request, the child of a client's traceparent if it sent one.
    span_name = f"{route.verb} {route.path}"
    attributes = {"http.request.method": route.verb, "http.route": route.path}

    async def handle(request: web.Request) -> web.Response:
        with _tracer.start_as_current_span(
            span_name,
            context=extract(request.headers),
            kind=SpanKind.SERVER,
            attributes=attributes,
        ) as span:
            response = await respond(request)
            http_status(span, response.status)
            return response

    return handle


@web.middleware
async def _json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """The router's own 404 and 405 in the API's error format (google.rpc.Status)."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        return error_response(
            ApiError(
                grpc.StatusCode.UNIMPLEMENTED,
                "METHOD_NOT_ALLOWED",
                f"{request.method} is not allowed on {request.path} (allowed: {allowed})",
                [("method", f"{request.method} not allowed; use {allowed}")],
                http_override=405,
            )
        )
    except web.HTTPNotFound:
        return error_response(
            ApiError(
                grpc.StatusCode.NOT_FOUND,
                "NO_SUCH_ROUTE",
                f"no route for {request.method} {request.path} (docs/api.md lists them)",
                [("path", f"{request.path}: no such route")],
            )
        )


def make_app(core: Any, max_bytes: int) -> web.Application:
    app = web.Application(client_max_size=max_bytes, middlewares=[_json_errors])
    for route in http_routes():
        app.router.add_route(route.verb, route.path, _handler(core, route, max_bytes))

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app.router.add_get("/healthz", healthz)
    return app
