"""GET /metrics: the counters move as requests succeed, pass 4xx through, retry and get cut, and the
exposition is valid Prometheus text (parsed with prometheus_client's own parser)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import E2E_BUCKETS_S, Histogram, Metrics, MetricsDirectory, status_class
from gateway.upstream import UpstreamConnectError, UpstreamDisconnected, UpstreamRequest, UpstreamTimeout
from tests.gateway.http._fakes import MODEL, FakeResponse, Harness, Script, sse, worker

A = "http://10.0.0.1:30000"
B = "http://10.0.0.2:30000"

CHAT_BODY = b'{"model": "deepseek-ai/DeepSeek-V3", "messages": [{"role": "user", "content": "Hello"}]}'
STREAM_BODY = CHAT_BODY[:-1] + b', "stream": true}'
CHAT_REPLY = (
    b'{"id":"abc","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant",'
    b'"content":"Hi!"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"total_tokens":15,'
    b'"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":8}}}'
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(harness: Harness, headers: dict[str, str] | None = None) -> tuple[Samples, str]:
    async with harness.client() as client:
        reply = await client.get("/metrics", headers=headers or {})
    assert reply.status_code == 200, reply.text
    samples: Samples = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k != "process"}
            samples[(sample.name, frozenset(labels.items()))] = sample.value
    return samples, reply.headers["content-type"]


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def post(harness: Harness, body: bytes = CHAT_BODY, path: str = "/v1/chat/completions") -> int:
    async with harness.client() as client:
        reply = await client.post(path, content=body, headers={"content-type": "application/json"})
    return reply.status_code


def harness_for(script: Script, workers: Sequence[str] = (A,)) -> Harness:
    return Harness([worker(url, dp_size=2) for url in workers], script)


async def test_a_success_counts_the_request_the_decision_latency_and_the_cache_report() -> None:
    harness = harness_for(lambda _r: FakeResponse(200, [CHAT_REPLY]))
    assert await post(harness) == 200
    samples, content_type = await scrape(harness)

    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert value(samples, "cachet_requests_total", endpoint="chat", model=MODEL, code="2xx") == 1
    assert value(samples, "cachet_requests_in_flight") == 0
    decisions = [k for k in samples if k[0] == "cachet_routing_decisions_total"]
    assert len(decisions) == 1
    assert dict(decisions[0][1]) == {"policy": "round_robin", "worker": A, "dp_rank": "0"}
    assert value(samples, "cachet_request_duration_seconds_count", model=MODEL) == 1
    assert value(samples, "cachet_time_to_first_token_seconds_count", model=MODEL) == 0  # not streamed
    assert value(samples, "cachet_cache_reports_total", model=MODEL) == 1
    assert value(samples, "cachet_cached_tokens_reported_total", model=MODEL) == 8
    assert value(samples, "cachet_cached_tokens_predicted_total", model=MODEL) == 0  # cold index
    assert value(samples, "cachet_cached_tokens_prediction_error_total", model=MODEL) == 8
    assert value(samples, "cachet_prompt_tokens_total", model=MODEL) == 12
    assert value(samples, "cachet_upstream_retries_total", model=MODEL) == 0
    assert not [k for k in samples if k[0] == "cachet_upstream_failures_total"]


async def test_a_stream_observes_time_to_first_token() -> None:
    stream = sse(b'{"choices":[{"delta":{"content":"Hi"}}]}', b'{"choices":[],"usage":{"prompt_tokens":5}}')
    harness = harness_for(lambda _r: FakeResponse(200, stream, content_type="text/event-stream"))
    assert await post(harness, STREAM_BODY) == 200
    samples, _ = await scrape(harness)
    assert value(samples, "cachet_time_to_first_token_seconds_count", model=MODEL) == 1
    assert value(samples, "cachet_time_to_first_token_seconds_bucket", model=MODEL, le="+Inf") == 1
    assert value(samples, "cachet_request_duration_seconds_count", model=MODEL) == 1
    assert value(samples, "cachet_cache_reports_total", model=MODEL) == 0  # no cached_tokens reported


async def test_an_upstream_4xx_is_counted_as_4xx_without_latency_or_failure() -> None:
    harness = harness_for(lambda _r: FakeResponse(400, [b'{"object":"error","message":"bad"}']))
    assert await post(harness) == 400
    samples, _ = await scrape(harness)
    assert value(samples, "cachet_requests_total", endpoint="chat", model=MODEL, code="4xx") == 1
    assert value(samples, "cachet_requests_total", endpoint="chat", model=MODEL, code="2xx") == 0
    assert value(samples, "cachet_request_duration_seconds_count", model=MODEL) == 0
    assert not [k for k in samples if k[0] == "cachet_upstream_failures_total"]


async def test_gateway_made_errors_are_counted_without_a_client_chosen_model_label() -> None:
    harness = harness_for(lambda _r: FakeResponse(200, [CHAT_REPLY]))
    assert await post(harness, b'{"model": "no-such-model", "messages": []}') == 404
    assert await post(harness, b"{not json") == 400
    async with harness.client() as client:
        assert (await client.get("/generate")).status_code == 405
    samples, _ = await scrape(harness)
    assert value(samples, "cachet_requests_total", endpoint="chat", model="", code="4xx") == 2
    assert value(samples, "cachet_requests_total", endpoint="generate", model="", code="4xx") == 1
    assert not [k for k in samples if ("model", "no-such-model") in k[1]]


@pytest.mark.parametrize(
    ("first", "kind"),
    [
        (UpstreamConnectError("refused"), "connect"),
        (UpstreamTimeout("no headers"), "timeout"),
        (FakeResponse(503, [b"overloaded"]), "status_5xx"),
        (
            FakeResponse(200, [], content_type="text/event-stream", fail_with=UpstreamDisconnected("rst")),
            "disconnect",
        ),
    ],
)
async def test_a_retry_counts_the_failure_kind_and_the_retry(
    first: Exception | FakeResponse, kind: str
) -> None:
    def script(request: UpstreamRequest) -> FakeResponse:
        if request.url.startswith(A):
            if isinstance(first, Exception):
                raise first
            return first
        return FakeResponse(200, sse(b'{"choices":[]}'), content_type="text/event-stream")

    harness = harness_for(script, workers=(A, B))
    # Round robin starts on A, so the first attempt fails and the second lands on B.
    assert await post(harness, STREAM_BODY) == 200
    samples, _ = await scrape(harness)
    assert value(samples, "cachet_upstream_failures_total", worker=A, kind=kind) == 1
    assert sum(v for k, v in samples.items() if k[0] == "cachet_upstream_failures_total") == 1
    assert value(samples, "cachet_upstream_retries_total", model=MODEL) == 1
    assert value(samples, "cachet_requests_total", endpoint="chat", model=MODEL, code="2xx") == 1
    decided = {
        dict(k[1])["worker"]: v for k, v in samples.items() if k[0] == "cachet_routing_decisions_total"
    }
    assert decided == {A: 1, B: 1}


async def test_every_server_failing_is_a_5xx_with_one_failure_per_attempt() -> None:
    def script(_request: UpstreamRequest) -> FakeResponse:
        raise UpstreamConnectError("refused")

    harness = harness_for(script, workers=(A, B))
    assert await post(harness) == 502
    samples, _ = await scrape(harness)
    assert value(samples, "cachet_requests_total", endpoint="chat", model=MODEL, code="5xx") == 1
    assert value(samples, "cachet_upstream_failures_total", worker=A, kind="connect") == 1
    assert value(samples, "cachet_upstream_failures_total", worker=B, kind="connect") == 1
    assert value(samples, "cachet_upstream_retries_total", model=MODEL) == 1  # no third server left
    assert value(samples, "cachet_request_duration_seconds_count", model=MODEL) == 0


async def test_a_stream_cut_mid_way_counts_mid_stream_and_no_completed_latency() -> None:
    cut = FakeResponse(
        200,
        [b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n'],
        content_type="text/event-stream",
        fail_with=UpstreamDisconnected("reset"),
    )
    harness = harness_for(lambda _r: cut)
    assert await post(harness, STREAM_BODY) == 200
    samples, _ = await scrape(harness)
    assert value(samples, "cachet_upstream_failures_total", worker=A, kind="mid_stream") == 1
    assert value(samples, "cachet_upstream_retries_total", model=MODEL) == 0
    assert value(samples, "cachet_time_to_first_token_seconds_count", model=MODEL) == 1
    assert value(samples, "cachet_request_duration_seconds_count", model=MODEL) == 0
    assert value(samples, "cachet_requests_total", endpoint="chat", model=MODEL, code="2xx") == 1


async def test_worker_health_is_one_gauge_per_worker() -> None:
    harness = Harness([worker(A), worker(B, healthy=False)], lambda _r: FakeResponse(200, [CHAT_REPLY]))
    samples, _ = await scrape(harness)
    assert value(samples, "cachet_worker_healthy", worker=A, role="regular", model=MODEL) == 1
    assert value(samples, "cachet_worker_healthy", worker=B, role="regular", model=MODEL) == 0


async def test_metrics_need_the_admin_token_when_one_is_set() -> None:
    harness = Harness([worker(A)], lambda _r: FakeResponse(200, [CHAT_REPLY]), admin_token="s3cret")
    async with harness.client() as client:
        assert (await client.get("/metrics")).status_code == 401
    samples, _ = await scrape(harness, {"authorization": "Bearer s3cret"})
    assert value(samples, "cachet_requests_in_flight") == 0


def test_exposition_is_strict_prometheus_text_with_escaped_labels() -> None:
    metrics = Metrics()
    metrics.request_done("chat", 'we"ird\\model\nname', 200)
    metrics.model("m").e2e.observe(0.2)
    metrics.model("m").ttft.observe(1e9)  # above every bound: only +Inf
    text = metrics.render().decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    [request] = families["cachet_requests"].samples
    assert request.labels["model"] == 'we"ird\\model\nname'
    ttft = {
        s.labels.get("le"): s.value
        for s in families["cachet_time_to_first_token_seconds"].samples
        if s.name.endswith("_bucket")
    }
    assert ttft["60.0"] == 0 and ttft["+Inf"] == 1
    label = r'\w+="([^"\\\n]|\\["\\n])*"'
    line = rf"^(# (HELP|TYPE) \w+ .+|\w+(\{{{label}(,{label})*\}})? [-+0-9.eInf]+)$"
    for row in text.splitlines():
        assert re.match(line, row), row


def test_histogram_buckets_are_inclusive_upper_bounds() -> None:
    histogram = Histogram(E2E_BUCKETS_S)
    histogram.observe(0.1)  # exactly a bound: counted in that bucket (Prometheus le is <=)
    histogram.observe(0.1000001)
    index = E2E_BUCKETS_S.index(0.1)
    assert histogram.counts[index] == 1 and histogram.counts[index + 1] == 1
    assert histogram.count == 2


def test_status_classes() -> None:
    assert [status_class(s) for s in (0, 200, 204, 404, 499, 502)] == [
        "client_closed", "2xx", "2xx", "4xx", "4xx", "5xx",
    ]  # fmt: skip


def _exited_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True
    )
    return int(done.stdout)


async def test_processes_sharing_a_directory_all_answer_with_the_sums(tmp_path: Path) -> None:
    first, second = Metrics(), Metrics()
    first.request_done("chat", MODEL, 200)
    first.model(MODEL).e2e.observe(0.3)
    first.decision("prefix_aware", A, 1)
    second.request_done("chat", MODEL, 200)
    second.request_done("generate", MODEL, 503)
    second.model(MODEL).e2e.observe(2.0)
    second.model(MODEL).cache_report(10, 12, 40)
    second.decision("prefix_aware", A, 1)
    second.upstream_failure(B, "timeout")
    second.in_flight = 3
    live = os.getpid()
    gone = _exited_pid()
    one = MetricsDirectory(tmp_path, first, pid=live)
    other = MetricsDirectory(tmp_path, second, pid=gone)
    await other.start()
    await other.stop()  # an exited process: its counts stay, its in-flight requests do not
    await one.start()
    try:
        total = one.collect()
    finally:
        await one.stop()
    assert total.requests == {("chat", MODEL, "2xx"): 2, ("generate", MODEL, "5xx"): 1}
    assert total.decisions == {("prefix_aware", A, 1): 2}
    assert total.upstream_failures == {(B, "timeout"): 1}
    assert total.in_flight == 0
    stats = total.models[MODEL]
    assert stats.e2e.count == 2 and stats.e2e.total == pytest.approx(2.3)
    assert (stats.cached_tokens_predicted, stats.cached_tokens_reported, stats.prompt_tokens) == (10, 12, 40)
    # The live process's own in-flight requests count; the sums render as valid exposition.
    first.in_flight = 2
    assert one.collect().in_flight == 2
    assert list(text_string_to_metric_families(one.collect().render().decode()))
