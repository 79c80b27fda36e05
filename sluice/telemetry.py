"""OpenTelemetry for every service: traces and metrics (docs/observability.md).

Traces: one trace per ingest request, carried as W3C trace context (`traceparent`,
`tracestate`) in NATS message headers from ingest to the expander, on every mail pointer to
the deliverer, on every event to the webhook POST; clients may send their own `traceparent`
(HTTP header or gRPC metadata). `[telemetry] exporter` = "none" (default), "console" or
"otlp". With "none" no tracer provider is installed: the API's no-op tracer costs a context
variable lookup per span, and `inject` writes nothing, so pointers and events carry no extra
headers.

Metrics: instruments are created here at import (no-op until `setup_metrics`), recorded
where things happen, and read by a `PrometheusMetricReader` that registers into
prometheus_client's default REGISTRY (served on /metrics by sluice.health); with "otlp" they
are also pushed to the collector.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import aiohttp
from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from sluice import names
from sluice.config import TelemetryConfig
from sluice.v1 import messages_pb2

__all__ = [
    "EXPORTERS",
    "TRACE_HEADERS",
    "count_accepted",
    "count_event",
    "count_suppressed",
    "count_webhook_post",
    "extract",
    "http_client_trace",
    "http_status",
    "inject",
    "observe_sites",
    "remote_parent",
    "rpc_status",
    "setup_metrics",
    "setup_tracing",
    "trace_headers",
    "tracer",
    "tracing",
]

log = logging.getLogger(__name__)

EXPORTERS = ("none", "console", "otlp")
# The W3C trace context headers (lower-case: NATS headers and gRPC metadata are exact-match).
TRACE_HEADERS = ("traceparent", "tracestate")

_tracer_provider: TracerProvider | None = None
_meter_provider: MeterProvider | None = None


def _resource(cfg: TelemetryConfig, service: str) -> Resource:
    return Resource.create({"service.name": service, "service.namespace": cfg.service_namespace})


def _check(cfg: TelemetryConfig) -> None:
    if cfg.exporter not in EXPORTERS:
        raise ValueError(
            f"[telemetry] exporter {cfg.exporter!r}: use one of {', '.join(EXPORTERS)}"
        )
    if not 0.0 <= cfg.sample_ratio <= 1.0:
        raise ValueError(f"[telemetry] sample_ratio {cfg.sample_ratio}: use 0.0 to 1.0")


def setup_tracing(cfg: TelemetryConfig, service: str, exporter: SpanExporter | None = None) -> None:
    """Install this process's tracer provider (once; `sluice dev` runs every service in one
    process, so the first service names the resource and each span's instrumentation scope
    names its component). `exporter` (tests) adds a synchronous exporter, whatever the
    config says."""
    global _tracer_provider
    _check(cfg)
    if exporter is None and cfg.exporter == "none":
        return
    if _tracer_provider is None:
        provider = TracerProvider(
            resource=_resource(cfg, service),
            sampler=ParentBased(TraceIdRatioBased(cfg.sample_ratio)),
        )
        trace.set_tracer_provider(provider)
        _tracer_provider = provider
        if cfg.exporter != "none":
            _tracer_provider.add_span_processor(_span_processor(cfg))
    if exporter is not None:
        _tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))


def _span_processor(cfg: TelemetryConfig) -> SpanProcessor:
    if cfg.exporter == "console":
        return BatchSpanProcessor(ConsoleSpanExporter())
    # Imported only when used: the OTLP exporter pulls in its own gRPC channel machinery.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return BatchSpanProcessor(OTLPSpanExporter(endpoint=cfg.otlp_endpoint or None))


def setup_metrics(cfg: TelemetryConfig, service: str) -> None:
    """Install this process's meter provider (once): Prometheus exposition through
    prometheus_client's default REGISTRY, plus a periodic OTLP push with exporter "otlp"."""
    global _meter_provider
    _check(cfg)
    if _meter_provider is not None or not cfg.metrics:
        return
    from opentelemetry.exporter.prometheus import PrometheusMetricReader

    readers: list[MetricReader] = [PrometheusMetricReader()]
    if cfg.exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        readers.append(
            PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=cfg.otlp_endpoint or None))
        )
    _meter_provider = MeterProvider(
        resource=_resource(cfg, service),
        metric_readers=readers,
        # No exemplars: the trace-based filter looked up the current span on every
        # measurement (about 40 % of a histogram record).
        exemplar_filter=AlwaysOffExemplarFilter(),
    )
    metrics.set_meter_provider(_meter_provider)


# -- tracing helpers ----------------------------------------------------------------------


def tracing() -> bool:
    """Whether this process records traces (a tracer provider is installed): hot paths may
    skip the API's no-op spans altogether when it does not."""
    return _tracer_provider is not None


def tracer(component: str) -> trace.Tracer:
    """The tracer of a component ("ingest", "expander", "deliverer", "webhooks")."""
    return trace.get_tracer(f"sluice.{component}")


def extract(headers: Mapping[str, Any] | None) -> Context | None:
    """The remote parent carried in headers (NATS headers, an HTTP request's headers, gRPC
    metadata as a dict), or None when they carry none: without a `traceparent` nothing is
    parsed."""
    if not headers or "traceparent" not in headers:
        return None
    return propagate.extract(headers)


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Add the current trace context to headers (nothing when no span is being recorded)."""
    if trace.get_current_span().get_span_context().is_valid:
        propagate.inject(headers)
    return headers


def trace_headers() -> dict[str, str] | None:
    """The current trace context as headers of their own, or None when there is none."""
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers or None


@contextmanager
def remote_parent(headers: Mapping[str, Any] | None) -> Iterator[None]:
    """Make the trace context in headers current for the block (spans started in it are its
    children); a no-op when the headers carry none."""
    ctx = extract(headers)
    if ctx is None:
        yield
        return
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)


def http_status(span: Span, status: int, client: bool = False) -> None:
    """Record an HTTP status on a span: an error from 500 on a server span, from 400 on a
    client span (the semantic conventions' rule)."""
    if not span.is_recording():
        return
    span.set_attribute("http.response.status_code", status)
    if status >= (400 if client else 500):
        span.set_attribute("error.type", str(status))
        span.set_status(Status(StatusCode.ERROR))


# gRPC codes that mark a server span as failed (the rest are the client's doing).
_GRPC_SERVER_ERRORS = frozenset({2, 4, 12, 13, 14, 15})


def rpc_status(span: Span, code: int) -> None:
    """Record a gRPC status code on a server span."""
    if not span.is_recording():
        return
    span.set_attribute("rpc.grpc.status_code", code)
    if code in _GRPC_SERVER_ERRORS:
        span.set_status(Status(StatusCode.ERROR))


def http_client_trace(on_result: Callable[[bool], None] | None = None) -> aiohttp.TraceConfig:
    """An aiohttp client seam: a CLIENT span per request (the child of the current context),
    its trace context injected into the request's headers, the status (or the exception)
    recorded on it; `on_result(success)` is called for each request (2xx: success)."""

    async def start(
        _: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestStartParams
    ) -> None:
        span = _http_tracer.start_span(params.method, kind=SpanKind.CLIENT)
        ctx.span = span
        if span.is_recording():
            url = params.url
            span.set_attributes(
                {
                    "http.request.method": params.method,
                    # Without the query or credentials: tenants' URLs may hold tokens there.
                    "url.full": str(url.with_query(None).with_user(None)),
                    "server.address": url.host or "",
                    "server.port": url.port or 0,
                }
            )
        if span.get_span_context().is_valid:
            propagate.inject(params.headers, context=trace.set_span_in_context(span))

    async def end(
        _: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestEndParams
    ) -> None:
        status = params.response.status
        ctx.done = True
        http_status(ctx.span, status, client=True)
        ctx.span.end()
        if on_result is not None:
            on_result(200 <= status < 300)

    async def failed(
        _: aiohttp.ClientSession,
        ctx: SimpleNamespace,
        params: aiohttp.TraceRequestExceptionParams,
    ) -> None:
        if getattr(ctx, "done", False):
            return  # a failure after the response was counted: the span has ended
        span: Span = ctx.span
        if span.is_recording():
            span.record_exception(params.exception)
            span.set_attribute("error.type", type(params.exception).__qualname__)
            span.set_status(Status(StatusCode.ERROR, str(params.exception)))
        span.end()
        if on_result is not None:
            on_result(False)

    config = aiohttp.TraceConfig()
    config.on_request_start.append(start)
    config.on_request_end.append(end)
    config.on_request_exception.append(failed)
    return config


_http_tracer = tracer("http")


# -- metrics ------------------------------------------------------------------------------

_meter = metrics.get_meter("sluice")


# Message counts are kept in a plain dict (an increment costs a dictionary update) and handed
# to the SDK when metrics are collected, through observable counters: the SDK's synchronous
# Counter.add cost 10-30 us a call, more than the rest of settling a delivery.
_COUNTS: dict[tuple[str, str], int] = {}


def _counter(what: str, description: str) -> str:
    def observe(_: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(n, {"tier": tier}) for (w, tier), n in list(_COUNTS.items()) if w == what
        ]

    _meter.create_observable_counter(f"sluice.messages.{what}", [observe], "{message}", description)
    return what


def _add(what: str, tier: names.Tier, n: int = 1) -> None:
    key = (what, _TIER_TOKENS.get(tier, "unknown"))
    _COUNTS[key] = _COUNTS.get(key, 0) + n


_TIER_TOKENS: dict[names.Tier, str] = {t: names.tier_token(t) for t in names.TIERS}
_ACCEPTED = _counter("accepted", "Messages (one per recipient) accepted by ingest.")
_DELIVERED = _counter("delivered", "Messages delivered (2xx at end of DATA).")
_DEFERRED = _counter("deferred", "Delivery attempts deferred (4xx, connection or DNS).")
_BOUNCED = _counter("bounced", "Messages bounced (5xx) and dead-lettered.")
_FAILED = _counter("failed", "Messages dead-lettered without a bounce (horizon, MaxDeliver).")
_SUPPRESSED = _counter("suppressed", "Messages not sent: the recipient is suppressed.")
# Seconds: sub-second for critical mail up to the 72 h horizon of the retry ladder.
_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400, 259200)
_LATENCY = _meter.create_histogram(
    "sluice.delivery.latency",
    "s",
    "From acceptance (or send_at, if later) to delivery.",
    explicit_bucket_boundaries_advisory=_LATENCY_BUCKETS,
)
_WEBHOOK_POSTS = _meter.create_counter(
    "sluice.webhook.posts", "{request}", "Webhook POSTs by outcome (success: a 2xx answer)."
)

_SITE_WAITS = _meter.create_counter(
    "sluice.deliverer.site_waits",
    "{message}",
    "Hash-bucket mail whose site had no free connection of the loop that fetched it, by how"
    " it went on: queued for another connection loop of the process serving the site, or"
    " handed back to JetStream for a moment (queued mail that then finds no connection is"
    " handed back too, and counts in both).",
)
_QUEUED = {"how": "queued"}
_HANDED_BACK = {"how": "handed_back"}

_BY_EVENT = {
    messages_pb2.EVENT_TYPE_DELIVERED: _DELIVERED,
    messages_pb2.EVENT_TYPE_DEFERRED: _DEFERRED,
    messages_pb2.EVENT_TYPE_BOUNCED: _BOUNCED,
    messages_pb2.EVENT_TYPE_FAILED: _FAILED,
    messages_pb2.EVENT_TYPE_SUPPRESSED: _SUPPRESSED,
}
# One attribute mapping per tier, made once (recording allocates none).
_TIER_ATTRS: dict[names.Tier, dict[str, str]] = {
    t: {"tier": names.tier_token(t)} for t in names.TIERS
}
_UNKNOWN_TIER = {"tier": "unknown"}
_SUCCESS = {"outcome": "success"}
_FAILURE = {"outcome": "failure"}


def _tier(tier: names.Tier) -> dict[str, str]:
    return _TIER_ATTRS.get(tier, _UNKNOWN_TIER)


def count_accepted(tier: names.Tier, n: int) -> None:
    _add(_ACCEPTED, tier, n)


def count_suppressed(tier: names.Tier, n: int = 1) -> None:
    _add(_SUPPRESSED, tier, n)


def count_event(
    event_type: names.EventType, tier: names.Tier, latency: float | None = None
) -> None:
    """Count a published outcome event; `latency` (seconds since acceptance) for deliveries."""
    what = _BY_EVENT.get(event_type)
    if what is None:
        return
    _add(what, tier)
    if latency is not None:
        _LATENCY.record(max(0.0, latency), _tier(tier))


def count_webhook_post(success: bool) -> None:
    _WEBHOOK_POSTS.add(1, _SUCCESS if success else _FAILURE)


def count_site_wait(n: int, queued: bool) -> None:
    """Count bucket mail whose site was busy: queued for another loop, or handed back."""
    _SITE_WAITS.add(n, _QUEUED if queued else _HANDED_BACK)


# The scheduler's view, read when metrics are collected (a scrape, or the OTLP push): each
# source returns {attribute values: value}. Set by observe_sites.
SiteSource = Callable[[], Mapping[tuple[str, ...], int]]
_sources: dict[str, SiteSource] = {}


def observe_sites(backlog: SiteSource, leases: SiteSource, connections: SiteSource) -> None:
    """Register the scheduler's gauges: backlog by (tier, site), leases and connections by
    (site,). The latest registration wins (a restarted scheduler replaces the old one)."""
    _sources.update(backlog=backlog, leases=leases, connections=connections)


def _gauge(
    source: str, keys: tuple[str, ...]
) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def callback(_: CallbackOptions) -> Iterable[Observation]:
        read = _sources.get(source)
        if read is None:
            return []
        return [Observation(v, dict(zip(keys, k, strict=True))) for k, v in read().items()]

    return callback


_meter.create_observable_gauge(
    "sluice.backlog",
    [_gauge("backlog", ("tier", "site"))],
    "{message}",
    "Messages stored in MAIL (ready and deferred) per tier and site, as the scheduler last read.",
)
_meter.create_observable_gauge(
    "sluice.site.leases",
    [_gauge("leases", ("site",))],
    "{lease}",
    "Leases the scheduler has granted per site (hash-bucket lanes as lane:<n>).",
)
_meter.create_observable_gauge(
    "sluice.site.connections",
    [_gauge("connections", ("site",))],
    "{connection}",
    "SMTP connections leased per site.",
)
