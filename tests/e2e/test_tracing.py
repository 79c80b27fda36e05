"""One trace per message, end to end: the ingest request's span → the expander's span (trace
context in the JOBS message's headers) → the deliverer's SMTP span (on every mail pointer) →
the webhook POST's span (on the event), and the POST carries a traceparent to the endpoint.
A client's own traceparent (HTTP header or gRPC metadata) becomes the root's parent.

The whole stack runs in this process (the `stack` fixture) with an in-memory span exporter
on the process's tracer provider."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import aiohttp
import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from sluice.config import TelemetryConfig
from sluice.telemetry import setup_tracing
from sluice.v1 import ingest_pb2, ingest_pb2_grpc, messages_pb2
from tests.conftest import Stack, wait_for


class _Exporter(InMemorySpanExporter):
    """Keeps spans only while a test here runs: the tracer provider, once installed, stays
    for the rest of the process, and later tests' spans are not worth keeping."""

    recording = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return super().export(spans) if self.recording else SpanExportResult.SUCCESS


# One exporter for the process: a tracer provider can be installed only once.
_EXPORTER = _Exporter()
_installed = False

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    global _installed
    if not _installed:
        setup_tracing(TelemetryConfig(), "sluice-test", exporter=_EXPORTER)
        _installed = True
    _EXPORTER.clear()
    _EXPORTER.recording = True
    yield _EXPORTER
    _EXPORTER.recording = False
    _EXPORTER.clear()


def _message(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "from": {"email": "alerts@acme.test"},
        "to": [{"email": "bob@mail.test"}],
        "subject": "traced",
        "text": "hello",
        "tier": "critical",
    }
    body.update(overrides)
    return body


async def _post(stack: Stack, body: Any, headers: dict[str, str] | None = None) -> Any:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{stack.http}/v1/send",
            json=body,
            headers={"Authorization": f"Bearer {stack.api_key}", **(headers or {})},
        ) as resp,
    ):
        assert resp.status == 202, await resp.text()
        return await resp.json()


def _of_trace(exporter: InMemorySpanExporter, trace_id: int) -> list[ReadableSpan]:
    return [
        s
        for s in exporter.get_finished_spans()
        if s.context is not None and s.context.trace_id == trace_id
    ]


def _through_smtp(exporter: InMemorySpanExporter, trace_id: int) -> list[ReadableSpan] | None:
    """The spans of a trace once its SMTP span has ended."""
    mine = _of_trace(exporter, trace_id)
    return mine if _named(mine, "smtp deliver") else None


def _named(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def _span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def _parent_id(span: ReadableSpan) -> int | None:
    return int(span.parent.span_id) if span.parent is not None else None


async def test_one_trace_from_ingest_to_the_webhook_post(
    stack: Stack, spans: InMemorySpanExporter
) -> None:
    body = await _post(stack, _message())
    delivered = await wait_for(
        lambda: stack.hooks.of_type("message.delivered"), what="the delivered webhook"
    )
    roots = await wait_for(
        lambda: _named(list(spans.get_finished_spans()), "POST /v1/send"), what="ingest span"
    )
    assert len(roots) == 1
    ingest = roots[0]
    assert ingest.context is not None
    trace_id = ingest.context.trace_id

    def chain() -> list[ReadableSpan] | None:
        """The trace once both webhook POSTs (accepted and delivered events) have ended."""
        mine = _of_trace(spans, trace_id)
        return mine if len(_named(mine, "POST")) >= 2 and _named(mine, "smtp deliver") else None

    mine = await wait_for(chain, what="the webhook POST spans of the message")

    assert ingest.parent is None, "no client traceparent: the request's span is the root"
    assert ingest.kind == SpanKind.SERVER
    assert ingest.attributes is not None
    assert ingest.attributes["http.response.status_code"] == 202
    assert ingest.attributes["http.route"] == "/v1/send"
    assert ingest.attributes["sluice.job_id"] == body["job_id"]

    [expander] = _named(mine, "process JOBS")
    assert expander.kind == SpanKind.CONSUMER
    assert _parent_id(expander) == _span_id(ingest)
    assert expander.parent is not None and expander.parent.is_remote, "crossed NATS"
    assert expander.attributes is not None
    assert expander.attributes["messaging.system"] == "nats"
    assert expander.attributes["sluice.pointers"] == 1

    [smtp] = _named(mine, "smtp deliver")
    assert smtp.kind == SpanKind.CLIENT
    assert _parent_id(smtp) == _span_id(expander), "the pointer carried the job's context"
    assert smtp.parent is not None and smtp.parent.is_remote
    assert smtp.attributes is not None
    assert smtp.attributes["sluice.outcomes"] == ("delivered",)
    assert smtp.attributes["server.address"] == "mx.mail.test"
    assert smtp.attributes["sluice.job_id"] == body["job_id"]
    assert smtp.status.status_code != StatusCode.ERROR

    posts = _named(mine, "POST")
    by_parent = {_parent_id(p): p for p in posts}
    # The delivered event's POST is the SMTP span's child; the accepted event's (published
    # by the expander) is the expander's.
    assert set(by_parent) == {_span_id(smtp), _span_id(expander)}, posts
    post = by_parent[_span_id(smtp)]
    assert post.kind == SpanKind.CLIENT
    assert post.attributes is not None
    assert post.attributes["http.response.status_code"] == 204
    assert post.attributes["url.full"] == f"http://127.0.0.1:{stack.hooks.port}/hook"

    # Every span of the message is in this one trace, and the endpoint saw the POST's context.
    assert {s.context.trace_id for s in mine if s.context} == {trace_id}
    version, sent_trace, sent_parent, flags = delivered[0].headers["traceparent"].split("-")
    assert (version, sent_trace, sent_parent) == (
        "00",
        f"{trace_id:032x}",
        f"{_span_id(post):016x}",
    )
    assert int(flags, 16) & 1, "sampled"


async def test_a_client_traceparent_is_the_parent_of_the_ingest_span(
    stack: Stack, spans: InMemorySpanExporter
) -> None:
    traceparent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    await _post(stack, _message(), {"traceparent": traceparent})

    req = ingest_pb2.SendRequest(
        to=[messages_pb2.Address(email="carol@other.test")],
        subject="via gRPC",
        text="hi",
        tier=messages_pb2.TIER_TRANSACTIONAL,
    )
    getattr(req, "from").email = "app@acme.test"
    grpc_trace = "0af7651916cd43dd8448eb211c80319c"
    async with grpc.aio.insecure_channel(stack.cfg.ingest.grpc_listen) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        await stub.Send(
            req,
            metadata=(
                ("authorization", f"Bearer {stack.api_key}"),
                ("traceparent", f"00-{grpc_trace}-b7ad6b7169203331-01"),
            ),
        )

    for trace_hex, parent_hex, name in (
        (CLIENT_TRACE, CLIENT_SPAN, "POST /v1/send"),
        (grpc_trace, "b7ad6b7169203331", "sluice.v1.IngestService/Send"),
    ):
        trace_id = int(trace_hex, 16)
        mine = await wait_for(
            lambda t=trace_id: _through_smtp(spans, t),
            what=f"the delivery span in the client's trace ({name})",
        )
        [ingest] = _named(mine, name)
        assert ingest.kind == SpanKind.SERVER
        assert ingest.parent is not None and ingest.parent.is_remote
        assert ingest.parent.span_id == int(parent_hex, 16)
        [expander] = _named(mine, "process JOBS")
        assert _parent_id(expander) == _span_id(ingest)
        [smtp] = _named(mine, "smtp deliver")
        assert _parent_id(smtp) == _span_id(expander)
    [grpc_span] = _named(_of_trace(spans, int(grpc_trace, 16)), "sluice.v1.IngestService/Send")
    assert grpc_span.attributes is not None
    assert grpc_span.attributes["rpc.system"] == "grpc"
    assert grpc_span.attributes["rpc.grpc.status_code"] == 0


@pytest.mark.parametrize(
    "cfg",
    [TelemetryConfig(exporter="jaeger"), TelemetryConfig(exporter="otlp", sample_ratio=1.5)],
)
def test_bad_telemetry_settings_are_config_errors(cfg: TelemetryConfig) -> None:
    with pytest.raises(ValueError, match=r"\[telemetry\]"):
        setup_tracing(cfg, "sluice-test")
