from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.telemetry import Telemetry

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_PARENT = "b7ad6b7169203331"


def make_telemetry() -> tuple[Telemetry, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    return Telemetry(processor=SimpleSpanProcessor(exporter)), exporter


def test_disabled_telemetry_records_nothing_and_sends_no_headers() -> None:
    telemetry = Telemetry()
    span = telemetry.start("chat", [("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01")])
    span.set(worker="http://w:1")
    assert not telemetry.enabled
    assert not span.recording
    assert span.upstream_headers() == []
    span.end(error="ignored")


def test_span_joins_the_clients_trace_and_carries_the_decision() -> None:
    telemetry, exporter = make_telemetry()
    span = telemetry.start(
        "POST /v1/chat/completions", {"TraceParent": f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"}
    )
    span.set(worker="http://w:1", dp_rank=3, policy="prefix_aware", cached_tokens=None)
    span.end()

    (finished,) = exporter.get_finished_spans()
    assert format(finished.context.trace_id, "032x") == CLIENT_TRACE
    assert finished.parent is not None and format(finished.parent.span_id, "016x") == CLIENT_PARENT
    assert finished.attributes == {
        "cachet.worker": "http://w:1",
        "cachet.dp_rank": 3,
        "cachet.policy": "prefix_aware",
    }


def test_upstream_headers_continue_the_trace_from_the_gateway_span() -> None:
    telemetry, exporter = make_telemetry()
    span = telemetry.start("generate", [])
    ((name, value),) = span.upstream_headers()
    span.end(error="upstream failed")

    (finished,) = exporter.get_finished_spans()
    assert name == "traceparent"
    version, trace_id, span_id, flags = value.split("-")
    assert version == "00"
    assert int(flags, 16) & 1, "the span is sampled, so the server should record it too"
    assert trace_id == format(finished.context.trace_id, "032x")
    assert span_id == format(finished.context.span_id, "016x")
    assert not finished.status.is_ok
