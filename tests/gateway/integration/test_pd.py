"""Prefill/decode disaggregation through the gateway: a simulated PD pool, real sockets, openai client."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import ChildProcess, find_free_port, wait_for_http

pytestmark = pytest.mark.timeout(120)
MODEL = "deepseek-ai/DeepSeek-V3"


@pytest.fixture(scope="module")
def pd_pool() -> Iterator[dict[str, Any]]:
    cluster = ChildProcess(
        [
            sys.executable,
            "-m",
            "backends.sim",
            "cluster",
            "--servers",
            "0",
            "--prefill",
            "2",
            "--decode",
            "1",
            "--dp-size",
            "2",
            "--preset",
            "h200-dp8",
            "--time-scale",
            "0.01",
            "--enable-cache-report",
        ]
    )
    gateway: ChildProcess | None = None
    try:
        servers = json.loads(cluster.wait_for_line(r"^CACHET-SIM-READY (.*)$", timeout=60).group(1))[
            "servers"
        ]
        prefills = [s for s in servers if s["role"] == "prefill"]
        [decode] = [s for s in servers if s["role"] == "decode"]
        port = find_free_port()
        gateway = ChildProcess(
            [
                sys.executable,
                "-m",
                "gateway",
                "serve",
                "--port",
                str(port),
                "--log-level",
                "warning",
                *[arg for p in prefills for arg in ("--prefill", f"{p['url']},{p['bootstrap_port']}")],
                "--decode",
                decode["url"],
            ]
        )
        url = f"http://127.0.0.1:{port}"
        wait_for_http(url + "/readiness", timeout=60, process=gateway)
        yield {"url": url, "prefills": [p["url"] for p in prefills], "decode": decode["url"]}
    finally:
        if gateway is not None:
            gateway.stop()
        cluster.stop()


@pytest.fixture
def client(pd_pool: dict[str, Any]) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=pd_pool["url"] + "/v1", api_key="unused", max_retries=0, timeout=30) as sdk:
        yield sdk


@pytest.fixture
def faults(pd_pool: dict[str, Any]) -> Iterator[Any]:
    def inject(url: str, **fields: Any) -> None:
        assert httpx.post(url + "/sim/faults", json=fields, timeout=5).status_code == 200

    try:
        yield inject
    finally:
        for server in [*pd_pool["prefills"], pd_pool["decode"]]:
            httpx.delete(server + "/sim/faults", timeout=5)


def test_chat_goes_through_prefill_then_decode(client: openai.OpenAI, pd_pool: dict[str, Any]) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello there"}], max_tokens=6
    )
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens == 6
    assert raw.headers["x-cachet-worker"] == pd_pool["decode"]
    assert raw.headers["x-cachet-prefill-worker"] in pd_pool["prefills"]
    assert raw.headers["x-cachet-prefill-dp-rank"] in {"0", "1"}


def test_streams_and_native_generate(client: openai.OpenAI, pd_pool: dict[str, Any]) -> None:
    text = "".join(
        chunk.choices[0].text
        for chunk in client.completions.create(model=MODEL, prompt="Once upon", max_tokens=8, stream=True)
        if chunk.choices
    )
    assert text
    with httpx.stream(
        "POST",
        pd_pool["url"] + "/generate",
        json={"text": "hi", "stream": True, "sampling_params": {"max_new_tokens": 4}},
    ) as stream:
        events = [line for line in stream.iter_lines() if line.startswith("data:")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][5:])["meta_info"]["completion_tokens"] == 4
    batch = httpx.post(
        pd_pool["url"] + "/generate",
        json={"text": ["a", "b"], "sampling_params": {"max_new_tokens": 2}},
        timeout=30,
    )
    assert batch.status_code == 200 and len(batch.json()) == 2


def test_failing_prefill_server_is_replaced_before_first_byte(
    client: openai.OpenAI, pd_pool: dict[str, Any], faults: Any
) -> None:
    bad, good = pd_pool["prefills"]
    faults(bad, error_rate=1.0)
    for i in range(4):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": f"q{i}"}], max_tokens=3, stream=i % 2 == 1
        )
        assert raw.status_code == 200 and raw.headers["x-cachet-prefill-worker"] == good


def test_prefill_pool_failure_is_an_openai_error_not_a_hang(
    client: openai.OpenAI, pd_pool: dict[str, Any], faults: Any
) -> None:
    for server in pd_pool["prefills"]:
        faults(server, error_rate=1.0)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4)
    assert caught.value.status_code in (502, 503)  # 503: every prefill server said its queue is full
    assert time.monotonic() - started < 10
    body = caught.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_decode_cut_mid_stream_ends_with_error_event(pd_pool: dict[str, Any], faults: Any) -> None:
    faults(pd_pool["decode"], drop_after_chunks=2)
    body = {"model": MODEL, "prompt": "tell", "max_tokens": 40, "stream": True}
    with httpx.stream("POST", pd_pool["url"] + "/v1/completions", json=body, timeout=30) as stream:
        raw = b"".join(stream.iter_raw())
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert "error" in json.loads(events[-2].removeprefix(b"data: "))
