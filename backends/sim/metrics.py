"""SGLang's Prometheus metrics (`--enable-metrics`), rendered as prometheus_client would render them."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from backends.sim.engine import RankLoad
from backends.sim.settings import ServerSettings
from backends.sim.versions import VersionBehaviour

TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400)
ITL_BUCKETS = (
    0.002,
    0.004,
    0.006,
    0.008,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.035,
    0.04,
    0.06,
    0.08,
    0.1,
    0.2,
    0.4,
    0.6,
    0.8,
    1,
    2,
    4,
    6,
    8,
)
E2E_BUCKETS = (*TTFT_BUCKETS, 600, 1200, 1800, 2400)
TOKEN_BUCKETS = (
    100,
    300,
    500,
    700,
    1000,
    1500,
    2000,
    3000,
    4000,
    5000,
    6000,
    7000,
    8000,
    9000,
    10000,
    12500,
    15000,
    17500,
    20000,
    22500,
    25000,
    27500,
    30000,
    35000,
    40000,
    60000,
    80000,
    1e5,
    2e5,
    3e5,
    4e5,
    6e5,
    8e5,
    1e6,
    1.1e6,
)


def go_float(value: float) -> str:
    """prometheus_client's floatToGoString."""
    d = float(value)
    if d == math.inf:
        return "+Inf"
    if d == -math.inf:
        return "-Inf"
    if math.isnan(d):
        return "NaN"
    s = repr(d)
    dot = s.find(".")
    if d > 0 and dot > 6:
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+0{dot - 1}"
    return s


class Histogram:
    __slots__ = ("bounds", "counts", "help", "name", "sum")

    def __init__(self, name: str, help_text: str, bounds: Sequence[float]) -> None:
        self.name = name
        self.help = help_text
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def render(self, labels: str, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {self.help}")
        out.append(f"# TYPE {self.name} histogram")
        cumulative = 0
        sep = "," if labels else ""
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            cumulative += count
            out.append(f'{self.name}_bucket{{{labels}{sep}le="{go_float(bound)}"}} {go_float(cumulative)}')
        out.append(f"{self.name}_sum{{{labels}}} {go_float(self.sum)}")
        out.append(f"{self.name}_count{{{labels}}} {go_float(cumulative)}")


class ServerMetrics:
    """Tokenizer counters/histograms fed by the runtime; scheduler gauges read from the ranks per scrape."""

    def __init__(self, settings: ServerSettings, version: VersionBehaviour, dp_size: int) -> None:
        self._settings = settings
        self._dp_size = dp_size
        self.engine_type = {"null": "unified"}.get(settings.disaggregation_mode, settings.disaggregation_mode)
        model = _escape(settings.model_name)
        self._tokenizer_labels = (
            f'model_name="{model}",engine_type="{self.engine_type}"'
            if version.tokenizer_engine_type_label
            else f'model_name="{model}"'
        )
        self._scheduler_labels = (
            f'model_name="{model}",engine_type="{self.engine_type}",tp_rank="0",pp_rank="0"'
        )
        self.num_requests = 0
        self.num_aborted = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.cached_tokens = 0
        self.running = 0
        self.http_requests: dict[tuple[str, str], int] = {}
        self.http_responses: dict[tuple[str, str, str], int] = {}
        self.http_active = 0
        self.ttft = Histogram(
            "sglang:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self.itl = Histogram(
            "sglang:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS
        )
        self.e2e = Histogram(
            "sglang:e2e_request_latency_seconds",
            "Histogram of End-to-end request latency in seconds",
            E2E_BUCKETS,
        )
        self.prompt_hist = Histogram(
            "sglang:prompt_tokens_histogram", "Histogram of prompt token length.", TOKEN_BUCKETS
        )
        self.generation_hist = Histogram(
            "sglang:generation_tokens_histogram", "Histogram of generation token length.", TOKEN_BUCKETS
        )

    def http_started(self, endpoint: str, method: str) -> None:
        key = (endpoint, method)
        self.http_requests[key] = self.http_requests.get(key, 0) + 1
        self.http_active += 1

    def http_finished(self, endpoint: str, method: str, status: int) -> None:
        key = (endpoint, str(status), method)
        self.http_responses[key] = self.http_responses.get(key, 0) + 1
        self.http_active -= 1

    def request_started(self) -> None:
        self.running += 1

    def request_aborted(self) -> None:
        self.running -= 1
        self.num_aborted += 1
        self.num_requests += 1

    def request_finished(
        self, *, prompt_tokens: int, completion_tokens: int, cached_tokens: int, e2e_s: float, aborted: bool
    ) -> None:
        self.running -= 1
        self.num_requests += 1
        if aborted:
            self.num_aborted += 1
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += completion_tokens
        self.cached_tokens += cached_tokens
        self.e2e.observe(e2e_s)
        self.prompt_hist.observe(prompt_tokens)
        self.generation_hist.observe(completion_tokens)

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_itl(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def render(self, loads: Sequence[RankLoad], waiting_pd: Sequence[int]) -> bytes:
        out: list[str] = []
        tl = self._tokenizer_labels
        for name, help_text, value in (
            ("sglang:prompt_tokens_total", "Number of prefill tokens processed.", self.prompt_tokens),
            (
                "sglang:generation_tokens_total",
                "Number of generation tokens processed.",
                self.generation_tokens,
            ),
            ("sglang:num_requests_total", "Number of requests processed.", self.num_requests),
            ("sglang:num_aborted_requests_total", "Number of requests aborted.", self.num_aborted),
        ):
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} counter")
            out.append(f"{name}{{{tl}}} {go_float(value)}")
        out.append("# HELP sglang:cached_tokens_total Number of cached prompt tokens.")
        out.append("# TYPE sglang:cached_tokens_total counter")
        for source in ("device", "total"):
            out.append(
                f'sglang:cached_tokens_total{{{tl},cache_source="{source}"}} {go_float(self.cached_tokens)}'
            )
        for histogram in (self.ttft, self.itl, self.e2e, self.prompt_hist, self.generation_hist):
            histogram.render(tl, out)
        self._render_gauges(loads, waiting_pd, out)
        self._render_http(out)
        out.append("")
        return "\n".join(out).encode()

    def _render_http(self, out: list[str]) -> None:
        out.append("# HELP sglang:http_requests_total Total number of HTTP requests by endpoint and method.")
        out.append("# TYPE sglang:http_requests_total counter")
        for (endpoint, method), count in self.http_requests.items():
            labels = f'endpoint="{endpoint}",method="{method}"'
            out.append(f"sglang:http_requests_total{{{labels}}} {go_float(count)}")
        out.append(
            "# HELP sglang:http_responses_total Total number of HTTP responses by endpoint and status."
        )
        out.append("# TYPE sglang:http_responses_total counter")
        for (endpoint, status, method), count in self.http_responses.items():
            labels = f'endpoint="{endpoint}",status_code="{status}",method="{method}"'
            out.append(f"sglang:http_responses_total{{{labels}}} {go_float(count)}")
        out.append("# HELP sglang:http_requests_active Number of HTTP requests being served.")
        out.append("# TYPE sglang:http_requests_active gauge")
        out.append(f"sglang:http_requests_active {go_float(self.http_active)}")

    def _render_gauges(self, loads: Sequence[RankLoad], waiting_pd: Sequence[int], out: list[str]) -> None:
        s = self._settings
        dp = self._dp_size > 1
        labels = [self._scheduler_labels + (f',dp_rank="{i}"' if dp else "") for i in range(len(loads))]
        prefill = s.disaggregation_mode == "prefill"
        decode = s.disaggregation_mode == "decode"
        gauges: list[tuple[str, str, list[float]]] = [
            ("num_running_reqs", "The number of running requests.", [x.num_running_reqs for x in loads]),
            (
                "num_queue_reqs",
                "The number of requests in the waiting queue.",
                [x.num_waiting_reqs for x in loads],
            ),
            (
                "num_grammar_queue_reqs",
                "The number of requests in the grammar waiting queue.",
                [0] * len(loads),
            ),
            ("num_used_tokens", "The number of used tokens.", [x.num_used_tokens for x in loads]),
            ("token_usage", "The token usage.", [x.token_usage for x in loads]),
            ("gen_throughput", "The generation throughput (token/s).", [x.gen_throughput for x in loads]),
            ("cache_hit_rate", "The prefix cache hit rate.", [x.cache_hit_rate for x in loads]),
            ("utilization", "The utilization.", [_utilization(x) for x in loads]),
            ("num_retracted_reqs", "The number of retracted requests.", [0] * len(loads)),
            ("num_paused_reqs", "The number of paused requests.", [0] * len(loads)),
            (
                "max_total_num_tokens",
                "Maximum total number of tokens in the KV cache pool.",
                [x.max_total_num_tokens for x in loads],
            ),
            ("page_size", "The page size of the KV cache.", [s.page_size] * len(loads)),
            (
                "num_pages",
                "The number of pages in the KV cache.",
                [x.max_total_num_tokens // max(s.page_size, 1) for x in loads],
            ),
            ("context_len", "The context length.", [s.context_length] * len(loads)),
            (
                "num_prefill_bootstrap_queue_reqs",
                "The number of requests in the prefill bootstrap queue.",
                [float(w) if prefill else 0.0 for w in waiting_pd],
            ),
            (
                "num_prefill_inflight_queue_reqs",
                "The number of requests in the prefill inflight queue.",
                [0] * len(loads),
            ),
            (
                "num_decode_prealloc_queue_reqs",
                "The number of requests in the decode prealloc queue.",
                [0] * len(loads),
            ),
            (
                "num_decode_transfer_queue_reqs",
                "The number of requests in the decode transfer queue.",
                [float(w) if decode else 0.0 for w in waiting_pd],
            ),
        ]
        for short, help_text, values in gauges:
            name = f"sglang:{short}"
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} gauge")
            for label, value in zip(labels, values, strict=False):
                out.append(f"{name}{{{label}}} {go_float(value)}")


def _utilization(load: RankLoad) -> float:
    return load.token_usage


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
