"""OpenTelemetry set-up per process. [telemetry] exporter: "none" (default) or "console".

Tracing across services (trace context in NATS headers and gRPC metadata) and OTLP export
come with the operations work; the set-up point is here so every service already calls it.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

from sluice.config import TelemetryConfig

__all__ = ["setup_tracing"]

_configured = False


def setup_tracing(cfg: TelemetryConfig, service: str) -> None:
    """Install a tracer provider once per process; unknown exporters are config errors."""
    global _configured
    if cfg.exporter not in ("none", "console"):
        raise ValueError(f'[telemetry] exporter {cfg.exporter!r}: use "none" or "console"')
    if _configured or cfg.exporter == "none":
        return
    provider = TracerProvider(
        resource=Resource.create(
            {
                "service.name": service,
                "service.namespace": cfg.service_namespace,
            }
        )
    )
    provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)
    _configured = True
