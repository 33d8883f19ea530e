"""Prometheus metrics of one gateway process, rendered in the text exposition format (0.0.4).

    metrics = Metrics()                                   # one per process, built at start-up
    metrics.request_done("chat", model, 200)              # hot path: a tuple key and an integer add
    metrics.model(model).ttft.observe(0.12)               # per-model histograms, preallocated buckets
    body = metrics.render(registry.workers(healthy_only=False))   # GET /metrics

The hot path only adds to integers and floats in structures that exist after the first request of
a kind (dicts keyed by small tuples, per-model objects with fixed bucket lists); every string is
formatted when Prometheus scrapes, never per request. There are no locks: the counters are touched
from one event loop.

Counters live in each process. With ``--workers N`` a scrape of the shared port reaches one
process at random, so the processes share a directory (``CACHET_METRICS_DIR``, made by
``gateway serve``): each writes a snapshot of its counters there every second and when it stops,
and the process that answers a scrape adds every snapshot to its own live counters. Any process
thus answers with the same sums (others' at most a second old); a process that exited keeps its
counts in the sum, its in-flight requests not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import msgspec

__all__ = [
    "CONTENT_TYPE",
    "E2E_BUCKETS_S",
    "FAILURE_KINDS",
    "METRICS_DIR_ENV",
    "TTFT_BUCKETS_S",
    "Histogram",
    "Metrics",
    "MetricsDirectory",
    "ModelMetrics",
    "status_class",
]

logger = logging.getLogger("cachet.gateway.metrics")

# The exposition format's media type (the HTTP layer appends "; charset=utf-8").
CONTENT_TYPE = "text/plain; version=0.0.4"
# Set by `gateway serve --workers N` for its processes: where they share their counters.
METRICS_DIR_ENV = "CACHET_METRICS_DIR"

# Time to first token spans a cached short prompt (milliseconds) to a long prefill queued behind
# others (tens of seconds); end-to-end adds generation, up to the read timeout.
TTFT_BUCKETS_S: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
E2E_BUCKETS_S: tuple[float, ...] = (
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip

# Why an upstream attempt failed:
#   connect     nothing was sent or received (refused, unreachable, DNS)
#   timeout     no headers or no next byte within the read timeout
#   status_5xx  the server answered 5xx before any byte reached the client
#   disconnect  the connection died before the response's first body byte
#   mid_stream  the connection died (or stalled) after the client had seen bytes: the stream was cut
#   error_reply PD prefill answered 200 with an error or an aborted request in its body
FAILURE_KINDS = ("connect", "timeout", "status_5xx", "disconnect", "mid_stream", "error_reply")

# Status class of the answer to the client; "client_closed" when the client disconnected before its
# answer was complete: before any byte, or mid-way through a stream or body (a partial answer is
# not a 2xx). A disconnect after the last byte was sent is counted by the status it got.
_STATUS_CLASSES = ("client_closed", "1xx", "2xx", "3xx", "4xx", "5xx")


def status_class(status: int) -> str:
    """The class label of an HTTP status; 0 means the client left before its answer was complete."""
    index = status // 100
    return _STATUS_CLASSES[index] if 0 < index < len(_STATUS_CLASSES) else _STATUS_CLASSES[0]


class WorkerLike(Protocol):
    """What the health gauge needs of gateway.registry.Worker."""

    @property
    def url(self) -> str: ...

    @property
    def model(self) -> str | None: ...

    @property
    def role(self) -> str: ...

    @property
    def healthy(self) -> bool: ...


class Histogram:
    """A cumulative histogram with fixed upper bounds; ``observe`` is one bisect and two adds."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        # counts[i] is the number of observations v with bounds[i-1] < v <= bounds[i]; the last
        # slot holds those above every bound (+Inf).
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)


class ModelMetrics:
    """Everything counted per model, created once per model."""

    __slots__ = (
        "cache_reports",
        "cached_tokens_abs_error",
        "cached_tokens_predicted",
        "cached_tokens_reported",
        "e2e",
        "prompt_tokens",
        "retries",
        "ttft",
    )

    def __init__(self) -> None:
        self.ttft = Histogram(TTFT_BUCKETS_S)
        self.e2e = Histogram(E2E_BUCKETS_S)
        self.retries = 0
        # Over requests whose server reported cached tokens only, so the two sums compare.
        self.cache_reports = 0
        self.cached_tokens_predicted = 0
        self.cached_tokens_reported = 0
        self.cached_tokens_abs_error = 0
        self.prompt_tokens = 0

    def cache_report(self, predicted: int, reported: int, prompt_tokens: int | None) -> None:
        self.cache_reports += 1
        self.cached_tokens_predicted += predicted
        self.cached_tokens_reported += reported
        self.cached_tokens_abs_error += abs(predicted - reported)
        if prompt_tokens is not None:
            self.prompt_tokens += prompt_tokens


class _ModelSnapshot(msgspec.Struct, array_like=True):
    ttft: list[int]
    ttft_total: float
    e2e: list[int]
    e2e_total: float
    retries: int
    cache_reports: int
    cached_tokens_predicted: int
    cached_tokens_reported: int
    cached_tokens_abs_error: int
    prompt_tokens: int


class _Snapshot(msgspec.Struct):
    pid: int
    in_flight: int
    requests: list[tuple[str, str, str, int]]
    upstream_failures: list[tuple[str, str, int]]
    decisions: list[tuple[str, str, int | None, int]]
    models: dict[str, _ModelSnapshot]


_SNAPSHOT = msgspec.json.Decoder(_Snapshot)
_ENCODER = msgspec.json.Encoder()


class Metrics:
    """The counters of one gateway process."""

    def __init__(self) -> None:
        self.in_flight = 0
        # (endpoint, model, status class) -> requests answered
        self.requests: dict[tuple[str, str, str], int] = {}
        # (worker URL, failure kind) -> upstream attempts that failed
        self.upstream_failures: dict[tuple[str, str], int] = {}
        # (policy, worker URL, DP rank or None) -> routing decisions
        self.decisions: dict[tuple[str, str, int | None], int] = {}
        self.models: dict[str, ModelMetrics] = {}

    def model(self, name: str) -> ModelMetrics:
        stats = self.models.get(name)
        if stats is None:
            stats = self.models[name] = ModelMetrics()
        return stats

    def request_done(self, endpoint: str, model: str, status: int) -> None:
        key = (endpoint, model, status_class(status))
        self.requests[key] = self.requests.get(key, 0) + 1

    def decision(self, policy: str, worker: str, dp_rank: int | None) -> None:
        key = (policy, worker, dp_rank)
        self.decisions[key] = self.decisions.get(key, 0) + 1

    def upstream_failure(self, worker: str, kind: str) -> None:
        key = (worker, kind)
        self.upstream_failures[key] = self.upstream_failures.get(key, 0) + 1

    def snapshot(self) -> bytes:
        """These counters as bytes another process can ``add`` to its own."""
        return _ENCODER.encode(
            _Snapshot(
                pid=os.getpid(),
                in_flight=self.in_flight,
                requests=[(*key, value) for key, value in self.requests.items()],
                upstream_failures=[(*key, value) for key, value in self.upstream_failures.items()],
                decisions=[(*key, value) for key, value in self.decisions.items()],
                models={
                    name: _ModelSnapshot(
                        ttft=stats.ttft.counts,
                        ttft_total=stats.ttft.total,
                        e2e=stats.e2e.counts,
                        e2e_total=stats.e2e.total,
                        retries=stats.retries,
                        cache_reports=stats.cache_reports,
                        cached_tokens_predicted=stats.cached_tokens_predicted,
                        cached_tokens_reported=stats.cached_tokens_reported,
                        cached_tokens_abs_error=stats.cached_tokens_abs_error,
                        prompt_tokens=stats.prompt_tokens,
                    )
                    for name, stats in self.models.items()
                },
            )
        )

    def add(self, raw: bytes, *, in_flight: bool = True) -> None:
        """Add another process's ``snapshot`` (its in-flight gauge only if ``in_flight``)."""
        snapshot = _SNAPSHOT.decode(raw)
        if in_flight:
            self.in_flight += snapshot.in_flight
        for endpoint, model, klass, value in snapshot.requests:
            key = (endpoint, model, klass)
            self.requests[key] = self.requests.get(key, 0) + value
        for worker, kind, value in snapshot.upstream_failures:
            failure = (worker, kind)
            self.upstream_failures[failure] = self.upstream_failures.get(failure, 0) + value
        for policy, worker, dp_rank, value in snapshot.decisions:
            decision = (policy, worker, dp_rank)
            self.decisions[decision] = self.decisions.get(decision, 0) + value
        for name, theirs in snapshot.models.items():
            ours = self.model(name)
            for histogram, counts, total in (
                (ours.ttft, theirs.ttft, theirs.ttft_total),
                (ours.e2e, theirs.e2e, theirs.e2e_total),
            ):
                if len(counts) != len(histogram.counts):
                    raise ValueError("snapshot histogram has different buckets")
                histogram.counts = [a + b for a, b in zip(histogram.counts, counts, strict=True)]
                histogram.total += total
            ours.retries += theirs.retries
            ours.cache_reports += theirs.cache_reports
            ours.cached_tokens_predicted += theirs.cached_tokens_predicted
            ours.cached_tokens_reported += theirs.cached_tokens_reported
            ours.cached_tokens_abs_error += theirs.cached_tokens_abs_error
            ours.prompt_tokens += theirs.prompt_tokens

    def render(self, workers: Iterable[WorkerLike] = ()) -> bytes:
        """The text exposition of every metric, with each worker's health as a gauge."""
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        def sample(name: str, labels: Sequence[tuple[str, object]], value: float) -> None:
            rendered = ",".join(f'{key}="{_escape(_label(val))}"' for key, val in labels)
            out.append(f"{name}{{{rendered}}} {_number(value)}" if rendered else f"{name} {_number(value)}")

        family(
            "cachet_requests_total",
            "counter",
            "Requests, by endpoint, model and status class (client_closed: the client left first).",
        )
        for (endpoint, model, klass), value in sorted(self.requests.items()):
            sample(
                "cachet_requests_total", (("endpoint", endpoint), ("model", model), ("code", klass)), value
            )

        family("cachet_requests_in_flight", "gauge", "Requests being served by this process.")
        sample("cachet_requests_in_flight", (), self.in_flight)

        models = sorted(self.models.items())
        for metric, attribute, help_text in (
            (
                "cachet_time_to_first_token_seconds",
                "ttft",
                "Streamed requests: from the request's arrival to the first body byte sent to the client.",
            ),
            (
                "cachet_request_duration_seconds",
                "e2e",
                "Successful requests: from the request's arrival to the last byte sent to the client.",
            ),
        ):
            family(metric, "histogram", help_text)
            for model, stats in models:
                histogram: Histogram = getattr(stats, attribute)
                cumulative = 0
                for bound, count in zip(histogram.bounds, histogram.counts, strict=False):
                    cumulative += count
                    sample(f"{metric}_bucket", (("model", model), ("le", _number(bound))), cumulative)
                cumulative += histogram.counts[-1]
                sample(f"{metric}_bucket", (("model", model), ("le", "+Inf")), cumulative)
                sample(f"{metric}_sum", (("model", model),), histogram.total)
                sample(f"{metric}_count", (("model", model),), cumulative)

        family(
            "cachet_upstream_retries_total",
            "counter",
            "Attempts on another server after a failure before the client saw a byte.",
        )
        for model, stats in models:
            sample("cachet_upstream_retries_total", (("model", model),), stats.retries)

        family(
            "cachet_upstream_failures_total",
            "counter",
            "Failed upstream attempts, by worker and kind "
            "(connect, timeout, status_5xx, disconnect, mid_stream, error_reply).",
        )
        for (worker, kind), value in sorted(self.upstream_failures.items()):
            sample("cachet_upstream_failures_total", (("worker", worker), ("kind", kind)), value)

        family(
            "cachet_routing_decisions_total", "counter", "Routing decisions, by policy, worker and DP rank."
        )
        for (policy, worker, dp_rank), value in sorted(
            self.decisions.items(), key=lambda item: (item[0][0], item[0][1], _label(item[0][2]))
        ):
            sample(
                "cachet_routing_decisions_total",
                (("policy", policy), ("worker", worker), ("dp_rank", dp_rank)),
                value,
            )

        for metric, attribute, help_text in (
            ("cachet_cache_reports_total", "cache_reports", "Responses whose server reported cached tokens."),
            (
                "cachet_cached_tokens_predicted_total",
                "cached_tokens_predicted",
                "Cached prompt tokens the router predicted, over responses that reported cached tokens.",
            ),
            (
                "cachet_cached_tokens_reported_total",
                "cached_tokens_reported",
                "Cached prompt tokens the servers reported.",
            ),
            (
                "cachet_cached_tokens_prediction_error_total",
                "cached_tokens_abs_error",
                "Sum of |predicted - reported| cached tokens, over the same responses.",
            ),
            (
                "cachet_prompt_tokens_total",
                "prompt_tokens",
                "Prompt tokens the servers reported, over the same responses.",
            ),
        ):
            family(metric, "counter", help_text)
            for model, stats in models:
                sample(metric, (("model", model),), getattr(stats, attribute))

        family("cachet_worker_healthy", "gauge", "1 while the registry counts the worker healthy, else 0.")
        for server in sorted(workers, key=lambda w: w.url):
            sample(
                "cachet_worker_healthy",
                (("worker", server.url), ("role", server.role), ("model", server.model)),
                int(server.healthy),
            )

        out.append("")
        return "\n".join(out).encode()


class MetricsDirectory:
    """Counters shared by the processes of one ``gateway serve --workers N`` through a directory."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        metrics: Metrics,
        *,
        interval_s: float = 1.0,
        pid: int | None = None,
    ) -> None:
        """``pid`` names this process's snapshot file (tests stand in for several processes)."""
        self._path = Path(path)
        self._metrics = metrics
        self._interval_s = interval_s
        self._own = self._path / f"{os.getpid() if pid is None else pid}.json"
        self._task: asyncio.Task[None] | None = None

    def publish(self) -> None:
        """Write this process's snapshot (atomically: a reader never sees half a file)."""
        partial = self._own.with_suffix(".tmp")
        partial.write_bytes(self._metrics.snapshot())
        partial.replace(self._own)

    def collect(self) -> Metrics:
        """This process's live counters plus every other process's last snapshot."""
        self.publish()
        total = Metrics()
        total.add(self._metrics.snapshot())
        for path in sorted(self._path.glob("*.json")):
            if path == self._own:
                continue
            try:
                raw = path.read_bytes()
                total.add(raw, in_flight=_alive(int(path.stem)))
            except (OSError, ValueError, msgspec.DecodeError) as exc:
                logger.warning("skipping metrics snapshot %s: %s", path, exc)
        return total

    async def start(self) -> None:
        self._path.mkdir(parents=True, exist_ok=True)
        self.publish()
        self._task = asyncio.get_running_loop().create_task(self._publish_every_interval())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        # The last word of a process that stops: its counts stay in the sums.
        in_flight, self._metrics.in_flight = self._metrics.in_flight, 0
        try:
            self.publish()
        finally:
            self._metrics.in_flight = in_flight

    async def _publish_every_interval(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                self.publish()
            except OSError as exc:
                logger.warning("could not publish metrics to %s: %s", self._path, exc)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _label(value: object) -> str:
    return "" if value is None else str(value)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value))
