"""OpenTelemetry tracing for the request path.

One span per client request, named after the endpoint, parented on the client's W3C ``traceparent``
when it sends one, and carrying the routing decision (worker, DP rank, policy, reason, predicted and
reported cached tokens, time to first token). The span's context is injected into the upstream
request, so an SGLang server started with ``--enable-trace`` nests its own spans under ours.

Tracing is off unless an OTLP endpoint is configured: then the API's no-op tracer is used and a
request pays for one attribute lookup, not for span bookkeeping.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["TRACE_HEADERS", "RequestSpan", "Telemetry"]

_PROPAGATOR = TraceContextTextMapPropagator()
# W3C trace-context headers: read from clients, replaced by the gateway span's upstream.
TRACE_HEADERS = frozenset({"traceparent", "tracestate"})


class RequestSpan:
    """The span of one proxied request; cheap no-op methods when tracing is off."""

    __slots__ = ("_span",)

    def __init__(self, span: Span | None) -> None:
        self._span = span

    @property
    def recording(self) -> bool:
        return self._span is not None and self._span.is_recording()

    def set(self, **attributes: str | int | float | bool | None) -> None:
        if self._span is None:
            return
        for name, value in attributes.items():
            if value is not None:
                self._span.set_attribute(f"cachet.{name}", value)

    def upstream_headers(self) -> list[tuple[str, str]]:
        """W3C trace headers to send upstream, so the server's spans join this trace."""
        if self._span is None:
            return []
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(self._span))
        return list(carrier.items())

    def end(self, *, error: str | None = None) -> None:
        if self._span is None:
            return
        if error is not None:
            self._span.set_status(Status(StatusCode.ERROR, error))
        self._span.end()


class Telemetry:
    """Tracing for one gateway process, resolved once at start-up."""

    def __init__(
        self,
        *,
        otlp_endpoint: str | None = None,
        service_name: str = "cachet-gateway",
        exporter: SpanExporter | None = None,
        processor: SpanProcessor | None = None,
    ) -> None:
        """Trace to ``otlp_endpoint`` (OTLP over HTTP, e.g. http://127.0.0.1:4318/v1/traces), or to a
        given exporter/processor (tests); with neither, tracing is off."""
        self._provider: TracerProvider | None = None
        if processor is None and exporter is None and otlp_endpoint:
            exporter = OTLPSpanExporter(endpoint=otlp_endpoint, timeout=5)
        if processor is None and exporter is not None:
            processor = BatchSpanProcessor(exporter)
        if processor is not None:
            # A provider of our own rather than the global one: several gateways in one process
            # (tests) must not share or fight over global state.
            self._provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
            self._provider.add_span_processor(processor)
        self._tracer = self._provider.get_tracer("cachet.gateway") if self._provider else None

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def start(self, name: str, headers: Iterable[tuple[str, str]] | Mapping[str, str]) -> RequestSpan:
        """Start the span of a request whose incoming headers are ``headers``."""
        if self._tracer is None:
            return RequestSpan(None)
        pairs = headers.items() if isinstance(headers, Mapping) else headers
        carrier = {key.lower(): value for key, value in pairs if key.lower() in TRACE_HEADERS}
        parent: Context | None = _PROPAGATOR.extract(carrier) if carrier else None
        return RequestSpan(self._tracer.start_span(name, context=parent, kind=SpanKind.SERVER))

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()
