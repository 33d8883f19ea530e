"""Gateways as deployed: replicas sharing Redis, several worker processes, and the demo command."""

from __future__ import annotations

import json
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.conftest import ChildProcess, find_free_port, wait_for_http

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cluster_urls() -> Iterator[list[str]]:
    process = ChildProcess(
        [
            sys.executable,
            "-m",
            "backends.sim",
            "cluster",
            "--servers",
            "2",
            "--dp-size",
            "4",
            "--preset",
            "h200-dp8",
            "--time-scale",
            "0.01",
            "--enable-cache-report",
        ]
    )
    try:
        match = process.wait_for_line(r"^CACHET-SIM-READY (.*)$", timeout=60)
        yield [server["url"] for server in json.loads(match.group(1))["servers"]]
    finally:
        process.stop()


def gateway(spawn: Callable[..., ChildProcess], urls: list[str], *args: str) -> str:
    port = find_free_port()
    workers = [arg for url in urls for arg in ("--worker", url)]
    process = spawn(
        [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--port",
            str(port),
            "--log-level",
            "warning",
            *workers,
            *args,
        ]
    )
    url = f"http://127.0.0.1:{port}"
    wait_for_http(url + "/readiness", timeout=60, process=process)
    return url


def ask(url: str, system: str, question: str) -> tuple[str, str]:
    reply = httpx.post(
        url + "/v1/chat/completions",
        json={
            "model": "deepseek-ai/DeepSeek-V3",
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
            "max_tokens": 2,
        },
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    return reply.headers["x-cachet-worker"], reply.headers["x-cachet-dp-rank"]


def test_replicas_sharing_redis_send_a_prefix_where_another_replica_cached_it(
    spawn: Callable[..., ChildProcess], redis_server: str, cluster_urls: list[str]
) -> None:
    first = gateway(spawn, cluster_urls, "--redis-url", redis_server)
    second = gateway(spawn, cluster_urls, "--redis-url", redis_server)
    for group in range(3):
        system = f"Group {group}: you answer in the voice of a lighthouse keeper. " * 120
        place = ask(first, system, "How is the sea?")
        # A replica pulls the others' index updates on each Redis round trip (any request does one).
        ask(second, f"Unrelated {group}.", "Hi?")
        # The second replica has never seen this prefix itself; only Redis can tell it where it lives.
        assert ask(second, system, "And the wind?") == place


def test_several_processes_serve_one_port(
    spawn: Callable[..., ChildProcess], redis_server: str, cluster_urls: list[str]
) -> None:
    url = gateway(spawn, cluster_urls, "--workers", "2", "--redis-url", redis_server)
    with ThreadPoolExecutor(8) as pool:
        places = list(pool.map(lambda i: ask(url, "Be brief.", f"Question {i}?"), range(32)))
    assert len(places) == 32
    assert {worker for worker, _ in places} <= set(cluster_urls)
    # Each process counts what it served; a scrape, whichever process answers it, shows the sums
    # once the others have published their snapshots (every second).
    time.sleep(1.5)
    for _ in range(6):
        text = httpx.get(url + "/metrics", timeout=10, headers={"connection": "close"}).text
        requests = re.search(
            r'^cachet_requests_total\{endpoint="chat",model="deepseek-ai/DeepSeek-V3",code="2xx"\} (\d+)$',
            text,
            re.MULTILINE,
        )
        assert requests is not None and int(requests.group(1)) == 32, text
        decisions = re.findall(r"^cachet_routing_decisions_total\{.*\} (\d+)$", text, re.MULTILINE)
        assert sum(map(int, decisions)) == 32


def test_demo_starts_serves_and_stops_cleanly(spawn: Callable[..., ChildProcess]) -> None:
    demo = spawn([sys.executable, "-m", "gateway", "demo", "--port", "0"])
    url = demo.wait_for_line(r"Cachet gateway ready at (http://\S+)", timeout=90).group(1)
    servers = re.findall(r"(http://127\.0\.0\.1:\d+) \(dp 4\)", demo.wait_for_line(r"cluster: ").string)
    assert len(servers) == 2
    demo.wait_for_line(
        r"time scale 0\.05 \(real seconds per simulated second: 20x faster than the hardware\)"
    )
    demo.wait_for_line(r"curl -si ")
    demo.wait_for_line(r"from openai import OpenAI")
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30) as client:
        [model] = [m.id for m in client.models.list()]
        text = "".join(
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8, stream=True
            )
            if chunk.choices
        )
    assert text
    demo.process.send_signal(signal.SIGTERM)
    assert demo.process.wait(timeout=30) == 0
    # The simulated cluster went with it.
    assert_stopped(servers, within_s=10)


def assert_stopped(servers: list[str], within_s: float) -> None:
    deadline = time.monotonic() + within_s
    for server in servers:
        while True:
            try:
                httpx.get(server + "/health", timeout=1)
            except httpx.TransportError:
                break
            assert time.monotonic() < deadline, f"{server} still answers after the demo stopped"
            time.sleep(0.1)


def start_demo(spawn: Callable[..., ChildProcess]) -> tuple[ChildProcess, list[str]]:
    demo = spawn([sys.executable, "-m", "gateway", "demo", "--port", "0", "--time-scale", "0.01"])
    demo.wait_for_line(r"Cachet gateway ready at (http://\S+)", timeout=90)
    servers = re.findall(r"(http://127\.0\.0\.1:\d+) \(dp 4\)", demo.wait_for_line(r"cluster: ").string)
    assert len(servers) == 2
    for server in servers:
        assert httpx.get(server + "/health", timeout=5).status_code == 200
    return demo, servers


def test_closing_the_demos_terminal_stops_the_cluster(spawn: Callable[..., ChildProcess]) -> None:
    demo, servers = start_demo(spawn)
    demo.process.send_signal(signal.SIGHUP)
    assert demo.process.wait(timeout=30) == 0
    assert_stopped(servers, within_s=10)


def test_a_killed_demo_leaves_no_cluster_behind(spawn: Callable[..., ChildProcess]) -> None:
    demo, servers = start_demo(spawn)
    # Only the demo itself, not its process group: nothing is left to stop the cluster.
    demo.process.kill()
    demo.process.wait(timeout=10)
    assert_stopped(servers, within_s=5)


def test_pd_demo_pairs_a_prefill_and_a_decode_server(spawn: Callable[..., ChildProcess]) -> None:
    demo = spawn([sys.executable, "-m", "gateway", "demo", "--pd", "--port", "0"])
    url = demo.wait_for_line(r"Cachet gateway ready at (http://\S+)", timeout=90).group(1)
    cluster = demo.wait_for_line(r"cluster: ").string
    prefill = re.findall(r"(http://127\.0\.0\.1:\d+) \(prefill, dp 4\)", cluster)
    decode = re.findall(r"(http://127\.0\.0\.1:\d+) \(decode, dp 4\)", cluster)
    assert len(prefill) == 2 and len(decode) == 2
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30) as client:
        [model] = [m.id for m in client.models.list()]
        reply = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8
        )
    assert reply.headers["x-cachet-prefill-worker"] in prefill
    assert reply.headers["x-cachet-worker"] in decode
    completion = reply.parse()
    assert completion.usage is not None and completion.usage.completion_tokens == 8
    demo.process.send_signal(signal.SIGTERM)
    assert demo.process.wait(timeout=30) == 0
