"""Locust load test with Cachet's benchmark workloads, for operators.

    pip install -e '.[bench]'
    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --workload shared-prefix \
        --model deepseek-ai/DeepSeek-V3 --users 32 --spawn-rate 8 --run-time 5m --headless

Workloads (--workload): shared-prefix (SGLang's generated-shared-prefix: --groups, --prompts-per-group,
--system-tokens, --question-tokens, --output-tokens, --zipf), multi-round (each locust user plays
one chat user: --rounds, --think-s, ...), mooncake (--trace, --limit). Requests stream; besides the
whole request, locust reports "TTFT" (time to first content chunk) and "TPOT" (ms per output token
after the first) as their own rows, and "cached tokens %" per request when the server reports it.
Arrival times in the workload are ignored: locust's users pace the load.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from argparse import Namespace
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from locust import HttpUser, between, events, task

from loadtests.workloads.cli import WORKLOADS, build_workload
from loadtests.workloads.mooncake import DEFAULT_TRACE
from loadtests.workloads.request import BenchRequest


@events.init_command_line_parser.add_listener  # type: ignore[untyped-decorator]
def _add_arguments(parser: Any) -> None:
    parser.add_argument("--workload", choices=WORKLOADS, default="shared-prefix", include_in_web_ui=True)
    parser.add_argument("--model", default="deepseek-ai/DeepSeek-V3", include_in_web_ui=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--prompts-per-group", type=int, default=16)
    parser.add_argument("--system-tokens", type=int, default=2048)
    parser.add_argument("--question-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--zipf", type=float, default=None)
    parser.add_argument("--chat-users", type=int, default=64, help="multi-round: distinct conversations")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--user-context-tokens", type=int, default=1024)
    parser.add_argument("--think-s", type=float, default=2.0)
    parser.add_argument("--trace", default=str(DEFAULT_TRACE))
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--max-input-tokens", type=int, default=None)


class _Source:
    """The workload, built once per locust process and handed out round-robin (thread-safe)."""

    def __init__(self, options: Any) -> None:
        args = Namespace(
            workload=options.workload, seed=options.seed, rate=None, groups=options.groups,
            prompts_per_group=options.prompts_per_group, system_tokens=options.system_tokens,
            question_tokens=options.question_tokens, output_tokens=options.output_tokens, zipf=options.zipf,
            users=options.chat_users, rounds=options.rounds, user_context_tokens=options.user_context_tokens,
            think_s=options.think_s, trace=Path(options.trace), limit=options.limit, time_scale=1.0,
            max_input_tokens=options.max_input_tokens,
        )  # fmt: skip
        self.requests = list(build_workload(args))
        if not self.requests:
            raise RuntimeError("the workload is empty")
        self.chats: list[list[BenchRequest]] = []
        if options.workload == "multi-round":
            by_user: dict[str, list[BenchRequest]] = {}
            for request in self.requests:
                by_user.setdefault(request.group, []).append(request)
            self.chats = list(by_user.values())
        self._lock = threading.Lock()
        self._next: Iterator[int] = itertools.cycle(range(len(self.requests)))
        self._next_chat: Iterator[int] = itertools.cycle(range(max(len(self.chats), 1)))

    def request(self) -> BenchRequest:
        with self._lock:
            return self.requests[next(self._next)]

    def chat(self) -> list[BenchRequest]:
        with self._lock:
            return self.chats[next(self._next_chat)]


@events.test_start.add_listener  # type: ignore[untyped-decorator]
def _build_workload(environment: Any, **_: Any) -> None:
    # Built once per locust process, before users start, and kept on the environment.
    environment.cachet_source = _Source(environment.parsed_options)


class CachetUser(HttpUser):
    wait_time = between(0.0, 0.5)

    def on_start(self) -> None:
        self.source: _Source = self.environment.cachet_source
        self.model = self.environment.parsed_options.model

    @task
    def send(self) -> None:
        if self.source.chats:
            for request in self.source.chat():
                if not self._stream(request):
                    return
                time.sleep(request.think_s if request.after is not None else 0.0)
        else:
            self._stream(self.source.request())

    def _stream(self, request: BenchRequest) -> bool:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": request.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        if request.messages is not None:
            path, name = "/v1/chat/completions", "chat"
            body["messages"] = request.messages
        else:
            path, name = "/v1/completions", "completion"
            body["prompt"] = request.prompt
        started = time.perf_counter()
        first: float | None = None
        usage: dict[str, Any] | None = None
        with self.client.post(
            path, json=body, stream=True, name=name, catch_response=True, timeout=600
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return False
            for line in response.iter_lines():
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if not payload or payload == b"[DONE]":
                    continue
                if first is None or b'"usage"' in payload:
                    chunk = json.loads(payload)
                    if first is None and _has_token(chunk):
                        first = time.perf_counter()
                    if isinstance(chunk.get("usage"), dict):
                        usage = chunk["usage"]
            response.success()
        finished = time.perf_counter()
        if first is not None:
            self._report("TTFT", name, (first - started) * 1000)
        if usage:
            completion = int(usage.get("completion_tokens") or 0)
            if first is not None and completion > 1:
                self._report("TPOT", name, (finished - first) * 1000 / (completion - 1))
            details = usage.get("prompt_tokens_details") or {}
            prompt = int(usage.get("prompt_tokens") or 0)
            if prompt and details.get("cached_tokens") is not None:
                self._report("cached tokens %", name, 100.0 * int(details["cached_tokens"]) / prompt)
        return True

    def _report(self, kind: str, name: str, value: float) -> None:
        self.environment.events.request.fire(
            request_type=kind, name=name, response_time=value, response_length=0, exception=None, context={}
        )


def _has_token(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("reasoning_content") or choice.get("text"):
            return True
    return False
