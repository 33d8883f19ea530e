"""The worker registry: discovery, health checks with hysteresis, and load polling."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable

import msgspec

from backends.sglang import RankLoadReport, dialect, parse_get_load, parse_v1_loads
from gateway._changes import ChangeLog
from gateway.registry._discovery import DiscoveryError, GatewaySaturated, discover, http_get, undiscovered
from gateway.registry._health import HealthTracker
from gateway.registry._models import ReportedLoad, Worker, WorkerSpec, normalise_url
from gateway.registry._speeds import DecodeStepEstimate
from gateway.upstream import Transport
from policies.types import Role, TargetKey

log = logging.getLogger("cachet.registry")

_LOAD_PATHS = ("/v1/loads", "/get_load")


class _Entry:
    """Mutable bookkeeping for one server; the Worker it exposes is immutable and swapped on change."""

    __slots__ = ("health", "load_path", "loads", "spec", "steps", "tasks", "worker")

    def __init__(self, spec: WorkerSpec, tracker: HealthTracker) -> None:
        self.spec = spec
        self.worker = undiscovered(spec)
        self.health = tracker
        self.load_path: str | None = None
        self.loads: dict[int, tuple[RankLoadReport, float]] = {}
        # Per DP rank: the decode step measured from its load reports.
        self.steps: dict[int, DecodeStepEstimate] = {}
        self.tasks: list[asyncio.Task[None]] = []


class WorkerRegistry:
    """Knows every configured upstream server, whether it is healthy, and what it last reported.

    ``start`` discovers all servers concurrently (an unreachable one is not fatal: it stays unhealthy
    and is retried every health interval), then keeps two loops per server: health checks
    (``GET /health``; ``fail_threshold`` failures in a row take it out, ``recover_threshold``
    successes bring it back, re-discovered in case it restarted with new settings) and load polling
    (``/v1/loads`` or ``/get_load`` by version, whichever exists), from which each rank's decode
    step is measured (``ReportedLoad.decode_step_s``, gateway.registry._speeds).
    """

    def __init__(
        self,
        specs: Iterable[WorkerSpec],
        transport: Transport,
        *,
        health_interval_s: float = 5.0,
        fail_threshold: int = 3,
        recover_threshold: int = 2,
        load_interval_s: float = 1.0,
        request_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        configured_models: Iterable[str] = (),
    ) -> None:
        """``configured_models``: models the operator says this gateway serves (``--model``); they
        count as served before any server has answered, so a request for one while its servers are
        still loading is "no healthy server, retry" (503), not "no such model" (404)."""
        if health_interval_s <= 0 or load_interval_s <= 0 or request_timeout_s <= 0:
            raise ValueError("registry intervals and timeouts must be positive")
        self._transport = transport
        self._health_interval_s = health_interval_s
        self._load_interval_s = load_interval_s
        self._timeout_s = request_timeout_s
        self._fail_threshold = fail_threshold
        self._recover_threshold = recover_threshold
        self._clock = clock
        self._configured_models = frozenset(configured_models)
        self._entries: dict[str, _Entry] = {}
        self._started = False
        # Bumped on every change to any Worker; lets workers() answer from a cache on the hot path.
        self._generation = 0
        # Which targets' load reports changed, so routing re-reads only those.
        self._reports: ChangeLog[TargetKey] = ChangeLog()
        self._views: dict[tuple[str | None, Role | None, bool], tuple[int, list[Worker]]] = {}
        for spec in specs:
            url = normalise_url(spec.url)
            if url in self._entries:
                raise ValueError(f"worker {url} configured twice")
            self._entries[url] = self._new_entry(spec)

    def _new_entry(self, spec: WorkerSpec) -> _Entry:
        tracker = HealthTracker(
            fail_threshold=self._fail_threshold, recover_threshold=self._recover_threshold
        )
        return _Entry(spec, tracker)

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Discover and health-check every server once (concurrently), then start the loops."""
        self._started = True
        entries = list(self._entries.values())
        await asyncio.gather(*(self._check(entry) for entry in entries))
        for entry in entries:
            self._spawn_loops(entry)

    async def stop(self) -> None:
        self._started = False
        tasks = [task for entry in self._entries.values() for task in entry.tasks]
        for entry in self._entries.values():
            entry.tasks = []
        await _cancel(tasks)

    def _spawn_loops(self, entry: _Entry) -> None:
        url = entry.worker.url
        entry.tasks = [
            asyncio.create_task(self._health_loop(entry), name=f"health {url}"),
            asyncio.create_task(self._load_loop(entry), name=f"loads {url}"),
        ]

    # --- queries ---------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        """Changes whenever any worker is added, removed, discovered, or changes health."""
        return self._generation

    def _changed(self) -> None:
        self._generation += 1

    def workers(
        self, model: str | None = None, role: Role | None = None, healthy_only: bool = True
    ) -> list[Worker]:
        """The matching workers (a fresh list the caller may keep or change)."""
        key = (model, role, healthy_only)
        cached = self._views.get(key)
        if cached is not None and cached[0] == self._generation:
            return list(cached[1])
        if len(self._views) > 256:
            self._views.clear()
        out = []
        for entry in self._entries.values():
            worker = entry.worker
            if healthy_only and not worker.healthy:
                continue
            if model is not None and worker.model != model:
                continue
            if role is not None and worker.role != role:
                continue
            out.append(worker)
        self._views[key] = (self._generation, out)
        return list(out)

    def worker(self, url: str) -> Worker | None:
        entry = self._entries.get(normalise_url(url))
        return entry.worker if entry else None

    def models(self) -> list[str]:
        """Every model served (healthy or not): configured by name, or some server's discovered or
        configured model."""
        names = {
            entry.worker.model
            for entry in self._entries.values()
            if entry.worker.discovered or entry.spec.model is not None
        }
        return sorted(names | self._configured_models)

    @property
    def report_version(self) -> int:
        return self._reports.version

    def report_changes_since(self, version: int) -> list[TargetKey] | None:
        """Targets whose load report changed after ``version`` (None if that is too long ago)."""
        return self._reports.changed_since(version)

    def reported_load(self, target: TargetKey) -> ReportedLoad | None:
        entry = self._entries.get(target.worker)
        if entry is None:
            return None
        found = entry.loads.get(target.dp_rank)
        if found is None:
            return None
        report, received_at = found
        step = entry.steps.get(target.dp_rank)
        return ReportedLoad(
            waiting=report.waiting,
            running=report.running,
            token_usage=report.token_usage,
            age_s=max(self._clock() - received_at, 0.0),
            used_tokens=report.used_tokens,
            waiting_uncached_tokens=report.waiting_uncached_tokens,
            gen_throughput=report.gen_throughput,
            cache_hit_rate=report.cache_hit_rate,
            decode_step_s=step.step_s if step is not None else None,
        )

    # --- changes at run time ---------------------------------------------------------------

    async def add(self, spec: WorkerSpec) -> Worker:
        """Add a server (or return the one already known under that URL), checked once before returning."""
        url = normalise_url(spec.url)
        existing = self._entries.get(url)
        if existing is not None:
            return existing.worker
        entry = self._new_entry(spec)
        self._entries[url] = entry
        self._changed()
        await self._check(entry)
        if self._started and self._entries.get(url) is entry:
            self._spawn_loops(entry)
        return entry.worker

    async def remove(self, url: str) -> bool:
        entry = self._entries.pop(normalise_url(url), None)
        if entry is None:
            return False
        self._changed()
        tasks, entry.tasks = entry.tasks, []
        await _cancel(tasks)
        return True

    def report_failure(self, url: str) -> None:
        """Count a failed proxied request (connect error) toward the failure threshold."""
        entry = self._entries.get(normalise_url(url))
        if entry is not None:
            self._observe(entry, ok=False)

    # --- health ----------------------------------------------------------------------------

    async def _health_loop(self, entry: _Entry) -> None:
        while True:
            await asyncio.sleep(self._health_interval_s)
            await self._check(entry)

    async def _check(self, entry: _Entry) -> None:
        """One health round: discover if needed, then GET /health."""
        just_discovered = False
        if not entry.worker.discovered:
            try:
                entry.worker = await discover(entry.spec, self._transport, self._timeout_s)
                self._changed()
            except GatewaySaturated as exc:
                log.warning("worker %s not asked (gateway saturated): %s", entry.worker.url, exc)
                return
            except DiscoveryError as exc:
                log.warning("worker %s not reachable yet: %s", entry.worker.url, exc)
                self._observe(entry, ok=False)
                return
            log.info(
                "discovered %s: model=%s role=%s dp_size=%d version=%s",
                entry.worker.url,
                entry.worker.model,
                entry.worker.role,
                entry.worker.dp_size,
                entry.worker.version or "?",
            )
            just_discovered = True
        ok = await self._probe_health(entry.worker.url)
        if ok is None:
            return
        was_healthy = entry.health.healthy
        coming_back = not was_healthy and entry.health.successes + 1 >= self._recover_threshold
        if ok and coming_back and not just_discovered:
            # About to come back: it may have restarted with other settings, so look again.
            try:
                entry.worker = msgspec.structs.replace(
                    await discover(entry.spec, self._transport, self._timeout_s), healthy=False
                )
                entry.steps = {}  # a restart may have changed what a step costs (MTP, hardware)
                self._changed()
            except GatewaySaturated:
                return
            except DiscoveryError:
                ok = False
        self._observe(entry, ok)

    async def _probe_health(self, url: str) -> bool | None:
        """True/False, or None when the gateway could not even ask (all its connections busy)."""
        try:
            status, _ = await http_get(self._transport, url + "/health", self._timeout_s)
        except GatewaySaturated:
            return None
        except DiscoveryError:
            return False
        return status == 200

    def _observe(self, entry: _Entry, ok: bool) -> None:
        if entry.health.observe(ok):
            healthy = entry.health.healthy
            entry.worker = msgspec.structs.replace(entry.worker, healthy=healthy)
            self._changed()
            # Coming up is routine (every start-up, every recovery); going down needs attention.
            if healthy:
                log.info("worker %s is now healthy", entry.worker.url)
            else:
                log.warning("worker %s is now UNHEALTHY", entry.worker.url)

    # --- loads -----------------------------------------------------------------------------

    async def _load_loop(self, entry: _Entry) -> None:
        while True:
            await asyncio.sleep(self._load_interval_s)
            if entry.worker.discovered and entry.worker.healthy:
                await self.poll_loads(entry.worker.url)

    async def poll_loads(self, url: str) -> bool:
        """Fetch one load report now; returns whether one was stored."""
        entry = self._entries.get(normalise_url(url))
        if entry is None or not entry.worker.discovered:
            return False
        worker = entry.worker
        first = entry.load_path or dialect(worker.version).loads_path
        paths = (first, *(p for p in _LOAD_PATHS if p != first))
        for path in paths:
            try:
                status, body = await http_get(self._transport, worker.url + path, self._timeout_s)
            except DiscoveryError as exc:
                log.debug("load poll of %s failed: %s", worker.url, exc)
                return False
            if status in (404, 405):
                continue
            if status != 200:
                log.debug("load poll of %s%s answered %d", worker.url, path, status)
                return False
            parse = parse_v1_loads if path == "/v1/loads" else parse_get_load
            try:
                reports = parse(body, worker.max_total_num_tokens or None)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.warning("load report from %s%s is malformed: %s", worker.url, path, exc)
                return False
            entry.load_path = path
            now = self._clock()
            entry.loads = {report.dp_rank: (report, now) for report in reports}
            self._reports.note_all(TargetKey(worker.url, report.dp_rank) for report in reports)
            for report in reports:
                step = entry.steps.get(report.dp_rank)
                if step is None:
                    step = entry.steps[report.dp_rank] = DecodeStepEstimate()
                step.observe(report.running, report.gen_throughput, worker.decode_step_s)
            return True
        return False


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
