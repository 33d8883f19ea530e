"""Trace propagation end to end, in process: client ``traceparent`` -> the gateway's span (in-memory
exporter) -> the ``traceparent`` the upstream received (a fake transport records it), on the regular
and the PD paths; and with tracing off, the client's header passes through untouched."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import msgspec
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.app import Gateway, create_app
from gateway.cli import build_parser, config_from_args
from gateway.config import GatewayConfig, load_config
from gateway.pd import PDSettings, make_pd_forwarder
from gateway.registry import Worker
from gateway.routing import make_router
from gateway.telemetry import Telemetry
from gateway.upstream import UpstreamConnectError, UpstreamRequest
from policies.types import Role
from tests.gateway.http._fakes import MODEL, FakeRegistry, FakeResponse, FakeTransport, Script, sse, worker

A = "http://10.0.0.1:30000"
B = "http://10.0.0.2:30000"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
CLIENT_TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"

STREAM_BODY = (
    b'{"model": "deepseek-ai/DeepSeek-V3", "messages": [{"role": "user", "content": "Hello"}], '
    b'"stream": true}'
)
STREAM_REPLY = sse(
    b'{"choices":[{"delta":{"content":"Hi"}}]}',
    b'{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":8}}}',
)


class Traced:
    """A gateway app built in-process with an in-memory span exporter and a recording transport."""

    def __init__(
        self, workers: Sequence[Worker], script: Script, *, pd: bool = False, pd_direct_below: int = 0
    ) -> None:
        self.exporter = InMemorySpanExporter()
        self.registry = FakeRegistry(workers)
        self.transport = FakeTransport(script)
        settings = PDSettings(direct_below_tokens=pd_direct_below)
        forwarder = make_pd_forwarder(self.registry, self.transport, settings, seed=1) if pd else None
        self.gateway = Gateway(
            GatewayConfig(),
            transport=self.transport,
            registry=self.registry,
            router=make_router("round_robin", self.registry, seed=1),
            telemetry=Telemetry(processor=SimpleSpanProcessor(self.exporter)),
            pd=forwarder,
        )
        self.app = create_app(self.gateway)

    async def post(self, body: bytes, headers: dict[str, str]) -> httpx.Response:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://gateway", timeout=10
        ) as client:
            return await client.post(
                "/v1/chat/completions", content=body, headers={"content-type": "application/json", **headers}
            )

    def span(self) -> ReadableSpan:
        [span] = self.exporter.get_finished_spans()
        return span

    def upstream_traceparents(self) -> list[list[str]]:
        return [[v for k, v in r.headers if k.lower() == "traceparent"] for r in self.transport.requests]


def ids(span: ReadableSpan) -> tuple[str, str]:
    return format(span.context.trace_id, "032x"), format(span.context.span_id, "016x")


def attributes(span: ReadableSpan) -> dict[str, Any]:
    assert span.attributes is not None
    return {k.removeprefix("cachet."): v for k, v in span.attributes.items()}


async def test_the_span_joins_the_clients_trace_carries_the_decision_and_is_the_upstreams_parent() -> None:
    traced = Traced(
        [worker(A, dp_size=2)], lambda _r: FakeResponse(200, STREAM_REPLY, content_type="text/event-stream")
    )
    reply = await traced.post(STREAM_BODY, {"traceparent": CLIENT_TRACEPARENT, "tracestate": "vendor=1"})
    assert reply.status_code == 200
    span = traced.span()
    trace_id, span_id = ids(span)
    assert trace_id == CLIENT_TRACE
    assert span.parent is not None and format(span.parent.span_id, "016x") == CLIENT_SPAN
    attrs = attributes(span)
    assert attrs["worker"] == A == reply.headers["x-cachet-worker"]
    assert attrs["dp_rank"] == int(reply.headers["x-cachet-dp-rank"])
    assert attrs["policy"] == "round_robin"
    assert attrs["reason"] == reply.headers["x-cachet-reason"]
    assert attrs["predicted_cached_tokens"] == int(reply.headers["x-cachet-cached-tokens"])
    assert attrs["cached_tokens"] == 8
    assert attrs["prompt_tokens"] == 12
    assert attrs["ttft_s"] > 0
    assert attrs["status"] == 200
    assert span.status.is_ok
    # The upstream got exactly one traceparent, naming the gateway's span as its parent.
    assert traced.upstream_traceparents() == [[f"00-{CLIENT_TRACE}-{span_id}-01"]]
    [request] = traced.transport.requests
    assert ("tracestate", "vendor=1") in [(k.lower(), v) for k, v in request.headers]


async def test_without_a_client_trace_the_gateway_starts_one_and_propagates_it() -> None:
    traced = Traced([worker(A)], lambda _r: FakeResponse(200, STREAM_REPLY, content_type="text/event-stream"))
    assert (await traced.post(STREAM_BODY, {})).status_code == 200
    span = traced.span()
    trace_id, span_id = ids(span)
    assert span.parent is None
    [[sent]] = traced.upstream_traceparents()
    assert sent.startswith(f"00-{trace_id}-{span_id}-")
    assert int(sent.rsplit("-", 1)[1], 16) & 1, "sampled, so the server records its spans too"


async def test_a_retried_request_is_one_span_and_every_attempt_carries_it() -> None:
    def script(request: UpstreamRequest) -> FakeResponse:
        if request.url.startswith(A):
            raise UpstreamConnectError("refused")
        return FakeResponse(200, STREAM_REPLY, content_type="text/event-stream")

    traced = Traced([worker(A), worker(B)], script)
    assert (await traced.post(STREAM_BODY, {"traceparent": CLIENT_TRACEPARENT})).status_code == 200
    span = traced.span()
    _, span_id = ids(span)
    assert traced.upstream_traceparents() == [[f"00-{CLIENT_TRACE}-{span_id}-01"]] * 2
    assert attributes(span)["worker"] == B


async def test_a_failed_request_ends_its_span_in_error_with_the_status() -> None:
    def script(_request: UpstreamRequest) -> FakeResponse:
        raise UpstreamConnectError("refused")

    traced = Traced([worker(A)], script)
    assert (await traced.post(STREAM_BODY, {})).status_code == 502
    span = traced.span()
    assert not span.status.is_ok
    assert attributes(span)["status"] == 502


async def test_with_tracing_off_the_clients_traceparent_passes_through_unchanged() -> None:
    registry = FakeRegistry([worker(A)])
    transport = FakeTransport(lambda _r: FakeResponse(200, STREAM_REPLY, content_type="text/event-stream"))
    gateway = Gateway(
        GatewayConfig(),
        transport=transport,
        registry=registry,
        router=make_router("round_robin", registry, seed=1),
    )
    assert not gateway.telemetry.enabled
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(gateway)), base_url="http://gateway", timeout=10
    ) as client:
        reply = await client.post(
            "/v1/chat/completions",
            content=STREAM_BODY,
            headers={"content-type": "application/json", "traceparent": CLIENT_TRACEPARENT},
        )
    assert reply.status_code == 200
    [request] = transport.requests
    assert [v for k, v in request.headers if k.lower() == "traceparent"] == [CLIENT_TRACEPARENT]


def _pd_server(request: UpstreamRequest) -> FakeResponse:
    """A prefill answers its one token; a decode streams the generation (SGLang PD's replies)."""
    body = msgspec.json.decode(request.body)
    assert "bootstrap_room" in body
    if not request.url.startswith(B):  # a prefill (B is the decode server)
        meta = {"finish_reason": {"type": "length", "length": 0}, "prompt_tokens": 12, "cached_tokens": 0}
        reply = msgspec.json.encode({"text": "", "output_ids": [5], "meta_info": meta})
        return FakeResponse(200, sse(reply), content_type="text/event-stream")
    return FakeResponse(200, STREAM_REPLY, content_type="text/event-stream")


async def test_pd_requests_get_one_span_propagated_to_both_legs_and_are_counted() -> None:
    prefill = msgspec.structs.replace(worker(A), role=Role.PREFILL, bootstrap_port=8998)
    decode = msgspec.structs.replace(worker(B), role=Role.DECODE)
    traced = Traced([prefill, decode], _pd_server, pd=True)
    reply = await traced.post(STREAM_BODY, {"traceparent": CLIENT_TRACEPARENT})
    assert reply.status_code == 200, reply.text
    span = traced.span()
    trace_id, span_id = ids(span)
    assert trace_id == CLIENT_TRACE
    attrs = attributes(span)
    assert attrs["pd"] == "disaggregated"
    assert attrs["pd_prefill"] == A and attrs["pd_decode"] == B
    assert attrs["status"] == 200
    # Both legs (prefill and decode) carry the gateway span's context, once each.
    assert sorted(r.url for r in traced.transport.requests) == [
        A + "/v1/chat/completions",
        B + "/v1/chat/completions",
    ]
    assert traced.upstream_traceparents() == [[f"00-{CLIENT_TRACE}-{span_id}-01"]] * 2

    metrics = traced.gateway.metrics
    assert metrics.requests == {("chat", MODEL, "2xx"): 1}
    assert metrics.in_flight == 0
    stats = metrics.models[MODEL]
    assert stats.ttft.count == 1 and stats.e2e.count == 1
    assert {worker: n for (_policy, worker, _rank), n in metrics.decisions.items()} == {A: 1, B: 1}
    assert metrics.upstream_failures == {} and stats.retries == 0


async def test_a_pd_leg_failure_is_counted_by_kind_and_the_new_pair_as_a_retry() -> None:
    refused: list[str] = []

    def script(request: UpstreamRequest) -> FakeResponse:
        is_prefill = not request.url.startswith(B)
        if is_prefill and not refused:  # the first prefill server tried refuses the connection
            refused.append(request.url.removesuffix("/v1/chat/completions"))
            raise UpstreamConnectError("refused")
        return _pd_server(request)

    prefills = [
        msgspec.structs.replace(worker(url), role=Role.PREFILL, bootstrap_port=8998)
        for url in (A, "http://10.0.0.4:30000")
    ]
    decode = msgspec.structs.replace(worker(B), role=Role.DECODE)
    traced = Traced([*prefills, decode], script, pd=True)
    assert (await traced.post(STREAM_BODY, {})).status_code == 200
    metrics = traced.gateway.metrics
    assert metrics.upstream_failures == {(refused[0], "connect"): 1}
    assert metrics.models[MODEL].retries == 1
    assert metrics.requests == {("chat", MODEL, "2xx"): 1}
    assert sum(metrics.decisions.values()) == 4  # two legs per attempt, two attempts


async def test_a_pd_request_served_directly_nests_the_regular_span_under_the_pd_verdict() -> None:
    prefill = msgspec.structs.replace(worker(A), role=Role.PREFILL, bootstrap_port=8998)
    decode = msgspec.structs.replace(worker(B), role=Role.DECODE)
    regular = worker("http://10.0.0.3:30000")
    traced = Traced(
        [prefill, decode, regular],
        lambda _r: FakeResponse(200, STREAM_REPLY, content_type="text/event-stream"),
        pd=True,
        pd_direct_below=100_000,  # every prompt is "short": the regular worker prefills it itself
    )
    reply = await traced.post(STREAM_BODY, {"traceparent": CLIENT_TRACEPARENT})
    assert reply.status_code == 200, reply.text
    [request] = traced.transport.requests
    assert request.url.startswith(regular.url)
    verdict, served = sorted(traced.exporter.get_finished_spans(), key=lambda s: s.start_time or 0)
    assert attributes(verdict)["pd"] == "direct"
    assert format(verdict.context.trace_id, "032x") == CLIENT_TRACE
    assert served.parent is not None and served.parent.span_id == verdict.context.span_id
    assert attributes(served)["worker"] == regular.url and attributes(served)["status"] == 200
    assert traced.upstream_traceparents() == [[f"00-{CLIENT_TRACE}-{ids(served)[1]}-01"]]
    # Counted once, by the proxy that served it.
    assert traced.gateway.metrics.requests == {("chat", MODEL, "2xx"): 1}


def test_the_otlp_endpoint_comes_from_flag_environment_or_file_and_turns_tracing_on(tmp_path: Path) -> None:
    endpoint = "http://127.0.0.1:4318/v1/traces"
    from_flag = config_from_args(build_parser().parse_args(["serve", "--otlp-endpoint", endpoint]), env={})
    from_env = load_config(env={"CACHET_OTLP_ENDPOINT": endpoint})
    config_file = tmp_path / "cachet.toml"
    config_file.write_text(f'otlp_endpoint = "{endpoint}"\n')
    from_file = load_config(config_file, env={})
    assert from_flag.otlp_endpoint == from_env.otlp_endpoint == from_file.otlp_endpoint == endpoint
    assert load_config(env={"CACHET_OTLP_ENDPOINT": ""}).otlp_endpoint is None
    assert not Gateway.from_config(GatewayConfig()).telemetry.enabled
    gateway = Gateway.from_config(from_env)
    try:
        assert gateway.telemetry.enabled  # exporting to the endpoint (nothing is sent until a span ends)
    finally:
        gateway.telemetry.shutdown()
