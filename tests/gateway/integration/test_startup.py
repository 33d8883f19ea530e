"""Starting the gateway when its surroundings are not ready yet: servers still loading, https
servers, Redis down, bad settings — real `gateway serve` processes, what an operator would see."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import ChildProcess, find_free_port, wait_for_http

pytestmark = pytest.mark.timeout(90)

MODEL = "deepseek-ai/DeepSeek-V3"


def serve(spawn: Callable[..., ChildProcess], *args: str) -> tuple[str, ChildProcess]:
    port = find_free_port()
    process = spawn([sys.executable, "-m", "gateway", "serve", "--port", str(port), *args])
    url = f"http://127.0.0.1:{port}"
    wait_for_http(url + "/health", timeout=60, process=process)
    return url, process


def test_a_configured_model_whose_server_is_still_loading_is_unavailable_not_unknown(
    spawn: Callable[..., ChildProcess],
) -> None:
    # SGLang takes minutes to load DeepSeek-V3: until then its port refuses connections.
    url, _ = serve(spawn, "--model", MODEL, "--worker", f"http://127.0.0.1:{find_free_port()}")
    reply = httpx.post(
        url + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        timeout=10,
    )
    assert reply.status_code == 503, reply.text
    assert int(reply.headers["retry-after"]) >= 0
    # A model nobody configured is still unknown.
    other = httpx.post(
        url + "/v1/chat/completions",
        json={"model": "no-such-model", "messages": [{"role": "user", "content": "Hi"}]},
        timeout=10,
    )
    assert other.status_code == 404, other.text


def run_serve(*args: str) -> subprocess.CompletedProcess[str]:
    """A `gateway serve` that is expected to refuse to start."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--port", str(find_free_port()), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--transport", "foo"), "unknown transport 'foo'"),
        (("--transport", "httptools", "--worker", "https://127.0.0.1:1"), "http:// only"),
    ],
)
def test_a_bad_transport_is_a_clean_configuration_error(args: tuple[str, ...], message: str) -> None:
    result = run_serve(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("gateway: invalid configuration: "), result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_https_workers_get_a_transport_that_speaks_tls(spawn: Callable[..., ChildProcess]) -> None:
    url, process = serve(spawn, "--worker", f"https://127.0.0.1:{find_free_port()}")
    process.wait_for_line(r"INFO cachet\.gateway: using the aiohttp transport")
    assert httpx.get(url + "/admin/config", timeout=10).json()["transport"] == "aiohttp"


def test_an_unreachable_redis_is_reported_at_start_up(
    spawn: Callable[..., ChildProcess], redis_server: str
) -> None:
    _, down = serve(spawn, "--redis-url", f"redis://127.0.0.1:{find_free_port()}/0")
    down.wait_for_line(r"WARNING cachet\.gateway: Redis at redis://127\.0\.0\.1:\d+/0 is not reachable")
    down.wait_for_line(r"local state until it answers")
    _, up = serve(spawn, "--redis-url", redis_server)
    up.wait_for_line(r"gateway ready to route: .* state redis")
    assert "not reachable" not in up.output


def test_every_process_of_a_multi_process_gateway_logs_like_a_single_one(
    spawn: Callable[..., ChildProcess],
) -> None:
    _, process = serve(spawn, "--workers", "2", "--worker", f"http://127.0.0.1:{find_free_port()}")
    line = r"^\d{4}-\d\d-\d\d [\d:,]+ INFO cachet\.gateway: gateway ready to route"
    process.wait_for_line(line)
    # The registry's warnings keep the same format too (not a bare message from Python's fallback).
    process.wait_for_line(
        r"^\d{4}-\d\d-\d\d [\d:,]+ WARNING cachet\.registry: worker http://\S+ not reachable"
    )
    deadline = time.monotonic() + 30
    while sum(1 for text in process.lines if re.search(line, text)) < 2:
        assert time.monotonic() < deadline, process.output
        time.sleep(0.1)
    assert not any(text.startswith("worker http://") for text in process.lines), process.output
