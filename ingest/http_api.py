"""The HTTP/JSON transport: grpc-gateway-style transcoding of IngestService onto aiohttp."""

from __future__ import annotations

import json
import logging
from typing import Any

import grpc
from aiohttp import web
from google.protobuf import json_format

from ingest.errors import ApiError, bad_request
from ingest.routes import ACCEPTED, HttpRoute, http_routes, snake
from sluice import jsonpb

__all__ = ["make_app"]

log = logging.getLogger(__name__)


def error_response(err: ApiError) -> web.Response:
    body = json_format.MessageToDict(err.status(), preserving_proto_field_name=True)
    headers = {}
    if err.http_status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="sluice"'
    return web.json_response(body, status=err.http_status, headers=headers)


def _handler(core: Any, route: HttpRoute, max_bytes: int) -> Any:
    method = getattr(core, snake(route.rpc.name))
    success = 202 if route.rpc.name in ACCEPTED else 200

    async def handle(request: web.Request) -> web.Response:
        try:
            data: dict[str, Any] = {}
            if route.body:
                if request.content_length is not None and request.content_length > max_bytes:
                    raise _too_large(max_bytes)
                raw = await request.read()
                try:
                    decoded = json.loads(raw) if raw else {}
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    raise bad_request([("body", f"is not valid JSON: {exc}")]) from exc
                if route.body == "*":
                    if not isinstance(decoded, dict):
                        raise bad_request([("body", "must be a JSON object")])
                    data = decoded
                else:
                    data[route.body] = decoded
            for name, value in request.match_info.items():
                data[name] = value
            try:
                msg = jsonpb.parse(data, route.rpc.request_cls)
            except jsonpb.JsonError as exc:
                raise bad_request(exc.violations) from exc
            result = await method(request.headers.get("Authorization"), msg)
            return web.json_response(jsonpb.to_dict(result), status=success)
        except ApiError as err:
            return error_response(err)
        except web.HTTPRequestEntityTooLarge:
            return error_response(_too_large(max_bytes))

    return handle


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "REQUEST_TOO_LARGE",
        f"request body is larger than {max_bytes} bytes",
        [("body", "too large")],
        http_override=413,
    )


def make_app(core: Any, max_bytes: int) -> web.Application:
    app = web.Application(client_max_size=max_bytes)
    for route in http_routes():
        app.router.add_route(route.verb, route.path, _handler(core, route, max_bytes))

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app.router.add_get("/healthz", healthz)
    return app
