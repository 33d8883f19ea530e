"""The gateway as users run it: real processes on real sockets, the official openai client.

One simulated cluster (2 servers x 2 DP ranks, 100x faster than real time) and one gateway process
serve the whole module; tests that inject faults into a server clear them when they end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import ChildProcess, find_free_port, wait_for_http

pytestmark = pytest.mark.timeout(120)

TIME_SCALE = "0.01"
MAX_BODY = 65536


@dataclass
class Cluster:
    servers: list[dict[str, Any]]
    process: ChildProcess

    @property
    def urls(self) -> list[str]:
        return [s["url"] for s in self.servers]

    @property
    def model(self) -> str:
        model: str = self.servers[0]["model"]
        return model


@dataclass
class GatewayProcess:
    url: str
    process: ChildProcess


def start_cluster(servers: int = 2, dp_size: int = 2) -> Cluster:
    process = ChildProcess(
        [
            sys.executable,
            "-m",
            "backends.sim",
            "cluster",
            "--servers",
            str(servers),
            "--dp-size",
            str(dp_size),
            "--preset",
            "h200-dp8",
            "--time-scale",
            TIME_SCALE,
            "--enable-cache-report",
        ]
    )
    match = process.wait_for_line(r"^CACHET-SIM-READY (.*)$", timeout=60)
    return Cluster(json.loads(match.group(1))["servers"], process)


def start_gateway(*args: str, ready: bool = True) -> GatewayProcess:
    port = find_free_port()
    process = ChildProcess(
        [sys.executable, "-m", "gateway", "serve", "--port", str(port), "--log-level", "warning", *args]
    )
    url = f"http://127.0.0.1:{port}"
    wait_for_http(url + ("/readiness" if ready else "/health"), timeout=60, process=process)
    return GatewayProcess(url, process)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    started = start_cluster()
    try:
        yield started
    finally:
        started.process.stop()


@pytest.fixture(scope="module")
def gateway(cluster: Cluster) -> Iterator[GatewayProcess]:
    workers = [arg for url in cluster.urls for arg in ("--worker", url)]
    started = start_gateway(
        *workers,
        "--health-interval",
        "0.5",
        "--retries",
        "2",
        "--max-body-bytes",
        str(MAX_BODY),
        "--seed",
        "7",
    )
    try:
        yield started
    finally:
        assert started.process.stop() == 0, started.process.output


@pytest.fixture
def client(gateway: GatewayProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=30) as sdk:
        yield sdk


@pytest.fixture
def faults(cluster: Cluster) -> Iterator[Any]:
    """``faults(url, **fields)`` injects faults into one simulated server; all are cleared afterwards."""

    def inject(url: str, **fields: Any) -> None:
        reply = httpx.post(url + "/sim/faults", json=fields, timeout=5)
        assert reply.status_code == 200, reply.text

    try:
        yield inject
    finally:
        for url in cluster.urls:
            # A server refusing connections comes back on its own (refuse_for_s); wait for it.
            deadline = time.monotonic() + 15
            while True:
                try:
                    httpx.delete(url + "/sim/faults", timeout=5)
                    break
                except httpx.ConnectError:
                    assert time.monotonic() < deadline, f"{url} did not come back"
                    time.sleep(0.1)


def inflight(url: str) -> int:
    state = httpx.get(url + "/sim/state", timeout=5).json()
    return sum(state["inflight"])


# -- the happy paths ---------------------------------------------------------------------------


def test_chat_non_streaming_with_receipt(client: openai.OpenAI, cluster: Cluster) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=cluster.model, messages=[{"role": "user", "content": "Tell me about Paris."}], max_tokens=12
    )
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens == 12
    assert raw.headers["x-cachet-worker"] in cluster.urls
    assert raw.headers["x-cachet-dp-rank"] in {"0", "1"}
    assert raw.headers["x-cachet-policy"] == "prefix_aware"


def test_chat_streaming(client: openai.OpenAI, cluster: Cluster) -> None:
    stream = client.chat.completions.create(
        model=cluster.model,
        messages=[{"role": "user", "content": "Count to ten."}],
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    text = []
    usage = None
    for chunk in stream:
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(text)
    assert usage is not None and usage.completion_tokens == 16


def test_completions_streaming_and_not(client: openai.OpenAI, cluster: Cluster) -> None:
    whole = client.completions.create(model=cluster.model, prompt="The capital of France is", max_tokens=5)
    assert whole.choices[0].text and whole.usage is not None and whole.usage.completion_tokens == 5
    pieces = [
        c.choices[0].text
        for c in client.completions.create(
            model=cluster.model, prompt="Once upon a time", max_tokens=6, stream=True
        )
        if c.choices
    ]
    assert "".join(pieces)


def test_shared_prefix_is_routed_to_the_cache_holder(client: openai.OpenAI, cluster: Cluster) -> None:
    system = "You are a meticulous assistant. " * 200
    places = set()
    cached = []
    for question in ["What is 2+2?", "Name a colour.", "Spell cat.", "Say hi."]:
        raw = client.chat.completions.with_raw_response.create(
            model=cluster.model,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            max_tokens=4,
        )
        places.add((raw.headers["x-cachet-worker"], raw.headers["x-cachet-dp-rank"]))
        usage = raw.parse().usage
        if usage is not None and usage.prompt_tokens_details is not None:
            cached.append(usage.prompt_tokens_details.cached_tokens or 0)
    assert len(places) == 1
    assert cached and max(cached) > 1000


def test_native_generate_streaming_and_not(gateway: GatewayProcess, cluster: Cluster) -> None:
    body = {"text": "Hello", "sampling_params": {"max_new_tokens": 8, "ignore_eos": True}}
    whole = httpx.post(gateway.url + "/generate", json=body, timeout=30)
    assert whole.status_code == 200
    assert whole.json()["meta_info"]["completion_tokens"] == 8
    with httpx.stream("POST", gateway.url + "/generate", json={**body, "stream": True}, timeout=30) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = [line for line in stream.iter_lines() if line.startswith("data:")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][5:])["meta_info"]["completion_tokens"] == 8


def test_models_and_readiness(client: openai.OpenAI, gateway: GatewayProcess, cluster: Cluster) -> None:
    assert [m.id for m in client.models.list()] == [cluster.model]
    assert httpx.get(gateway.url + "/readiness", timeout=5).status_code == 200
    assert httpx.get(gateway.url + "/health", timeout=5).status_code == 200
    workers = httpx.get(gateway.url + "/admin/workers", timeout=5).json()["workers"]
    assert sorted(w["url"] for w in workers) == sorted(cluster.urls)
    assert all(w["dp_size"] == 2 and w["healthy"] for w in workers)


# -- bad input over real sockets ------------------------------------------------------------------


def test_unknown_model_is_not_found_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "model_not_found"


def test_wrong_types_are_bad_request(client: openai.OpenAI, cluster: Cluster) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=cluster.model, messages="hello")  # type: ignore[arg-type]
    assert caught.value.param == "messages"


@pytest.mark.parametrize(
    "case",
    [
        ("POST", "/v1/chat/completions", b"{oops", {}, 400),
        ("POST", "/v1/chat/completions", b"", {}, 400),
        ("POST", "/v1/chat/completions", b"[]", {}, 400),
        ("POST", "/generate", b'{"text": 1}', {}, 400),
        ("POST", "/v1/completions", b"{}", {"content-type": "multipart/form-data; boundary=x"}, 400),
        ("POST", "/generate", b'{"text": "' + b"x" * MAX_BODY + b'"}', {}, 413),
        ("GET", "/v1/chat/completions", b"", {}, 405),
        ("DELETE", "/v1/models", b"", {}, 405),
        ("POST", "/v1/embeddings", b"{}", {}, 404),
        ("GET", "/nothing/here", b"", {}, 404),
    ],
)
def test_bad_requests_get_openai_shaped_errors(
    gateway: GatewayProcess, case: tuple[str, str, bytes, dict[str, str], int]
) -> None:
    method, path, body, headers, status = case
    reply = httpx.request(method, gateway.url + path, content=body, headers=headers, timeout=10)
    assert reply.status_code == status
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}


def test_upstream_4xx_passes_through(gateway: GatewayProcess, cluster: Cluster) -> None:
    reply = httpx.post(
        gateway.url + "/v1/completions",
        json={"model": cluster.model, "prompt": "x", "max_tokens": 0},
        timeout=10,
    )
    assert reply.status_code == 400
    assert "x-cachet-worker" in reply.headers  # the server's own answer, forwarded


def test_no_healthy_worker_is_503_with_retry_after(tmp_path: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}"
    config = tmp_path / "cachet.toml"
    config.write_text(
        f'retry_after_s = 3\nhealth_interval_s = 0.5\n[[workers]]\nurl = "{dead}"\nmodel = "m"\n'
    )
    started = start_gateway("--config", str(config), ready=False)
    try:
        assert httpx.get(started.url + "/readiness", timeout=5).status_code == 503
        reply = httpx.post(
            started.url + "/v1/chat/completions", json={"model": "m", "messages": []}, timeout=10
        )
        assert reply.status_code == 503 and reply.headers["retry-after"] == "3"
        assert reply.json()["error"]["code"] == "no_healthy_worker"
    finally:
        started.process.stop()


# -- failures -------------------------------------------------------------------------------------


def test_overloaded_server_fails_over_before_first_byte(
    client: openai.OpenAI, cluster: Cluster, faults: Any
) -> None:
    bad, good = cluster.urls
    faults(bad, error_rate=1.0)
    for i in range(6):
        raw = client.chat.completions.with_raw_response.create(
            model=cluster.model,
            messages=[{"role": "user", "content": f"question {i}"}],
            max_tokens=3,
            stream=i % 2 == 1,
        )
        assert raw.status_code == 200
        assert raw.headers["x-cachet-worker"] == good


def test_server_that_dies_is_failed_over_before_first_byte(cluster: Cluster) -> None:
    port = find_free_port()
    lone = ChildProcess(
        [sys.executable, "-m", "backends.sim", "serve", "--port", str(port), "--time-scale", TIME_SCALE]
    )
    lone.wait_for_line(r"^CACHET-SIM-READY", timeout=60)
    victim, survivor = f"http://127.0.0.1:{port}", cluster.urls[1]
    # Health checks far apart: the proxy's own retry has to save the requests.
    started = start_gateway(
        "--worker", victim, "--worker", survivor, "--policy", "round_robin", "--health-interval", "60"
    )
    try:
        with openai.OpenAI(base_url=started.url + "/v1", api_key="unused", max_retries=0, timeout=30) as sdk:
            used = {
                sdk.completions.with_raw_response.create(
                    model=cluster.model, prompt="x", max_tokens=2
                ).headers["x-cachet-worker"]
                for _ in range(4)
            }
            assert used == {victim, survivor}
            os.killpg(lone.process.pid, signal.SIGKILL)
            lone.process.wait(timeout=10)
            for i in range(6):
                raw = sdk.chat.completions.with_raw_response.create(
                    model=cluster.model,
                    messages=[{"role": "user", "content": "still there?"}],
                    max_tokens=3,
                    stream=i % 2 == 1,
                )
                assert raw.status_code == 200
                assert raw.headers["x-cachet-worker"] == survivor
    finally:
        started.process.stop()
        lone.stop()


def test_mid_stream_failure_ends_with_error_event_then_done(
    gateway: GatewayProcess, client: openai.OpenAI, cluster: Cluster, faults: Any
) -> None:
    for url in cluster.urls:
        faults(url, drop_after_chunks=3)
    body = {"model": cluster.model, "prompt": "tell me a story", "max_tokens": 50, "stream": True}
    started = time.monotonic()
    with httpx.stream("POST", gateway.url + "/v1/completions", json=body, timeout=30) as stream:
        assert stream.status_code == 200
        raw = b"".join(stream.iter_raw())
    assert time.monotonic() - started < 10  # ended, not hung
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    error = json.loads(events[-2].removeprefix(b"data: "))["error"]
    assert set(error) == {"message", "type", "param", "code"}
    with pytest.raises(openai.APIError):
        for _ in client.completions.create(model=cluster.model, prompt="again", max_tokens=50, stream=True):
            pass


def test_client_disconnect_aborts_the_upstream_request(gateway: GatewayProcess, cluster: Cluster) -> None:
    # Long enough to run for many seconds (its cumulative chunks grow with every token) unless aborted.
    body = {
        "text": "Write forever.",
        "stream": True,
        "sampling_params": {"max_new_tokens": 100000, "ignore_eos": True},
    }
    with httpx.stream("POST", gateway.url + "/generate", json=body, timeout=30) as stream:
        worker = stream.headers["x-cachet-worker"]
        chunks = stream.iter_raw()
        reading_since = time.monotonic()
        while time.monotonic() - reading_since < 0.3:
            next(chunks)
        assert inflight(worker) == 1
    # The client is gone: the gateway must drop its upstream connection so the server aborts.
    deadline = time.monotonic() + 3
    while inflight(worker) > 0:
        assert time.monotonic() < deadline, "the server kept generating after the client left"
        time.sleep(0.05)
