"""OpenTelemetry tracing (the `otel` extra), off unless `server.tracing` is true.

Spans: one per API request (the submit among them), one per engine round (a worker's
hold on a transaction, from claim or submit to release or finish) and one per branch
call. A W3C `traceparent` on the submit request becomes the parent; each branch call
sends its own span's `traceparent` header to the participant. The submit's trace
context is stored with the transaction (as the `traceparent` entry of its stored
extra headers), so a round run later, by another process, continues the same trace.

The exporter is the OTLP one, configured by the standard OTEL_* environment variables
(OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, ...). A tracer provider installed
before the app starts (tests use the SDK's in-memory exporter) is used as it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

log = logging.getLogger("coordinator.tracing")

TRACEPARENT = "traceparent"


class Tracing:
    def __init__(self) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import (
            TraceContextTextMapPropagator,
        )

        _ensure_provider()
        self._trace = trace
        self.tracer = trace.get_tracer("coordinator")
        self.propagator = TraceContextTextMapPropagator()

    @contextlib.contextmanager
    def span(
        self, name: str, *, headers: Mapping[str, str] | None = None, server: bool = False,
        attributes: Mapping[str, str] | None = None,
    ) -> Iterator[Any]:
        """A span, child of the current one, or of `headers`' traceparent when given
        and no span is current."""
        context = None
        if headers and not self._trace.get_current_span().get_span_context().is_valid:
            context = self.propagator.extract(carrier=dict(headers))
        kind = self._trace.SpanKind.SERVER if server else self._trace.SpanKind.INTERNAL
        with self.tracer.start_as_current_span(
            name, context=context, kind=kind, attributes=dict(attributes or {})
        ) as span:
            yield span

    @contextlib.contextmanager
    def client_span(self, name: str, attributes: Mapping[str, str]) -> Iterator[str]:
        """A client span; yields the traceparent header value to send."""
        with self.tracer.start_as_current_span(
            name, kind=self._trace.SpanKind.CLIENT, attributes=dict(attributes)
        ):
            yield self.current_traceparent()

    def current_traceparent(self) -> str:
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier)
        return carrier.get(TRACEPARENT, "")


def _ensure_provider() -> None:
    """Install the SDK with the OTLP exporter unless a provider is already set."""
    from opentelemetry import trace

    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win over our default name.
    named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", "")
    provider = TracerProvider(
        resource=Resource.create({} if named else {"service.name": "coordinator"})
    )
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        log.warning("server.tracing is on but opentelemetry-exporter-otlp is missing: "
                    "spans are made but not exported")
    else:
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


def setup(enabled: bool) -> Tracing | None:
    if not enabled:
        return None
    try:
        return Tracing()
    except ImportError as exc:
        raise RuntimeError(
            "server.tracing needs OpenTelemetry: pip install 'redis-coordinator[otel]'"
        ) from exc
