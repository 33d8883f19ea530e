"""The Router: request → features → snapshot → policy → reservation → Route with a receipt."""

from __future__ import annotations

import asyncio
import math
import random
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, Generic, Protocol, TypeVar

import msgspec

from gateway.routing._features import RoutingRequest, prompt_blocks
from gateway.state import Choice, Lease, ModelState, StateStore
from policies import cost
from policies.prefix import DEFAULT_BLOCK_BYTES, DEFAULT_BLOCK_IDS, PromptBlocks
from policies.types import (
    Decision,
    NoTarget,
    Policy,
    RequestFeatures,
    Role,
    Snapshot,
    TargetKey,
    TargetView,
)

__all__ = [
    "NoHealthyWorker",
    "Outcome",
    "RegistryLike",
    "Route",
    "Router",
    "RoutingError",
    "UnknownModel",
    "WorkerLike",
]

# Bytes of canonical prompt per token before any server has told us better (English, ~4).
_DEFAULT_BYTES_PER_TOKEN = 4.0
_BYTES_PER_TOKEN_RANGE = (0.5, 16.0)
_BYTES_PER_TOKEN_ALPHA = 0.2
# Cache-capacity scale applied after evidence the server evicted what we thought it held.
_SHRINK = 0.8
_RECOVER = 1.02
_MIN_SCALE = 0.05
_DEFAULT_MAX_NEW_TOKENS = 128
# KV capacity assumed for a rank that does not report max_total_num_tokens (tokens).
_UNKNOWN_CAPACITY_TOKENS = 500_000
# A lease's prompt tokens stop counting as queued prefill after margin × expected TTFT + slack.
_PREFILL_MARGIN = 1.5
# At most this many requests other replicas may add to a choice before it counts as taken.
_MAX_HEADROOM = 8
_PREFILL_SLACK_S = 0.0
# Prefill speed learned from observed TTFTs (see Router._learn_prefill_speed): a sample moves the
# estimate by alpha × its log-ratio to it, that ratio clamped to 2× — so one sample moves it by at
# most 2^0.2 ≈ 1.15×, and a speed 4× off the seed is within 5 % of it after 17 clean samples.
_SPEED_ALPHA = 0.2
_SPEED_MAX_PULL = math.log(2.0)
_SPEED_RANGE = (100.0, 10_000_000.0)
# A sample needs this many uncached prompt tokens in its prefill batch: that takes tens of ms or
# more, against about a millisecond of gateway and network time (and the engine's fixed cost per
# forward pass weighs less: on the simulator's H200 preset 500 tokens prefill at 11k tokens/s, 4,000
# at 35k).
_SPEED_MIN_UNCACHED = 1024
# A request routed to the same target after this one spoils its sample only if SGLang may have
# prefilled the two in one batch: if it arrived before this one's prefill started (within a decode
# step, if one was running, plus this much for the trip to the server), or at any time before the
# first token when this prompt is longer than one chunk (later chunks share their batch).
_JOIN_SLACK_S = 0.01
# SGLang's default --chunked-prefill-size on GPUs over 80 GB; divided by dp_size under DP attention.
_CHUNK_TOKENS = 8192


# The next-arrival cell of a Route that is not learning from (never written).
_NEVER = [math.inf]


class WorkerLike(Protocol):
    """What routing reads of a registry Worker."""

    @property
    def url(self) -> str: ...
    @property
    def role(self) -> Role: ...
    @property
    def dp_size(self) -> int: ...
    @property
    def max_total_num_tokens(self) -> int: ...
    @property
    def prefill_tokens_per_s(self) -> float: ...
    @property
    def decode_step_s(self) -> float: ...


W = TypeVar("W", bound=WorkerLike)
W_co = TypeVar("W_co", bound=WorkerLike, covariant=True)


class RegistryLike(Protocol[W_co]):
    """What routing needs of the worker registry (gateway.registry.WorkerRegistry)."""

    def workers(
        self, model: str | None = None, role: Role | None = None, healthy_only: bool = True
    ) -> Sequence[W_co]: ...

    def models(self) -> list[str]: ...

    def reported_load(self, target: TargetKey) -> Any: ...

    # Optional (looked up with getattr): ``report_version`` (an int bumped whenever a target's
    # reported load changes) and ``report_changes_since(version) -> list[TargetKey] | None``
    # (None: no longer known). With them the Router refreshes only the targets whose report
    # changed; without, it rebuilds every target's view each reported-load interval.


class RoutingError(Exception):
    """Routing could not place the request."""


class UnknownModel(RoutingError):
    """No registered server serves the requested model."""


class NoHealthyWorker(RoutingError):
    """Servers for the model exist but none is healthy (or all were excluded)."""


class Outcome(msgspec.Struct):
    """What the upstream response said, for load release and cache-index correction."""

    ok: bool
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None


class Route(Generic[W]):
    """Where one request goes. Hand it back to ``Router.finish`` exactly once."""

    __slots__ = (
        "__weakref__",
        "_blocks",
        "_decode_wait_s",
        "_finished",
        "_lease",
        "_next_arrival",
        "_predicted_blocks",
        "_prior_stamps",
        "_queued_ahead",
        "_quiet",
        "_routed_at",
        "_settled_below",
        "decision",
        "dp_rank",
        "receipt_headers",
        "worker",
    )

    def __init__(
        self,
        decision: Decision,
        worker: W,
        dp_rank: int | None,
        receipt_headers: list[tuple[str, str]],
        *,
        lease: Lease,
        blocks: PromptBlocks,
        predicted_blocks: int,
        prior_stamps: tuple[int, ...],
    ) -> None:
        self.decision = decision
        self.worker = worker
        self.dp_rank = dp_rank
        self.receipt_headers = receipt_headers
        self._lease = lease
        self._blocks = blocks
        self._predicted_blocks = predicted_blocks
        self._prior_stamps = prior_stamps
        # Blocks recorded at or after this stamp were recorded by requests still in flight when
        # this one was routed: the server may not have cached them yet (no evidence of eviction).
        self._settled_below: int | None = None
        self._finished = False
        # For learning the target's prefill speed from this request's TTFT: whether what was queued
        # ahead of it when routed is known (nothing, or only requests in its own prefill batch) and
        # how many tokens that was, when it was routed, when the next request was routed to the
        # same target (set then; a cell the Router holds instead of the Route), and the wait for a
        # running decode step the cost model adds there.
        self._quiet = False
        self._queued_ahead = 0
        self._routed_at = 0.0
        self._next_arrival: list[float] = _NEVER
        self._decode_wait_s = 0.0

    @property
    def target(self) -> TargetKey:
        return self.decision.target


def _choices_with_headroom(features: RequestFeatures, ranked: Sequence[TargetView]) -> list[Choice]:
    """The ranked targets as reservation choices, each with the in-flight count up to which it is
    still the better place for this request than the next choice.

    Another replica may have reserved on a target since this one last synced. Requiring the count
    seen exactly would let any such reservation push a deep prefix hit (est. 0.014 s) onto a cache
    miss (0.136 s): over HTTP, 3 replicas lost 15 points of hit rate that way. Each request added
    there is taken to queue about as much prefill as this one would, so a miss keeps almost no
    headroom (a burst of misses still spreads) and a hit keeps a lot (capped)."""
    estimates = [cost.ttft_s(features, view) for view in ranked]
    choices: list[Choice] = []
    for position, view in enumerate(ranked):
        headroom = 0
        if position + 1 < len(ranked):
            margin_s = estimates[position + 1] - estimates[position]
            per_request_s = cost.prefill_s(features, view)
            if margin_s > 0:
                headroom = min(int(margin_s / per_request_s), _MAX_HEADROOM)
        choices.append(Choice(view.key, view.inflight_requests + headroom))
    return choices


def _attr_int(load: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(load, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return int(value)
    return None


def _attr_float(load: Any, *names: str) -> float | None:
    for name in names:
        value = getattr(load, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


class _LastArrival:
    """The last request routed to a target, as the next one there needs to know it: when, its
    next-arrival cell, until when a request may still join its prefill batch, and — if what was
    queued ahead of it was known — the tokens queued once it is added (else -1)."""

    __slots__ = ("at", "cell", "join_until", "through")

    def __init__(self) -> None:
        self.at = -math.inf
        self.cell = [math.inf]
        self.join_until = -math.inf
        self.through = -1


class _Speed:
    """A worker's learned prefill speed (tokens/s per DP rank) and the samples behind it."""

    __slots__ = ("samples", "seed", "tokens_per_s")

    def __init__(self, seed: float) -> None:
        self.seed = seed
        self.tokens_per_s = seed
        self.samples = 0


def _spread_by_server(req: RoutingRequest, batch: int, role: Role) -> bool:
    """A native /generate batch is sent without a rank; the server spreads its items (the proxy
    pins /v1/* requests, lists of prompts included, with the X-Data-Parallel-Rank header). A PD
    prefill batch stays on its rank: every item's bootstrap room is chosen congruent to it."""
    return batch > 1 and req.endpoint == "generate" and role is not Role.PREFILL


def _header_safe(text: str) -> str:
    return text.encode("ascii", "replace").decode().replace("\r", " ").replace("\n", " ")


class _Table(Generic[W]):
    """One model's targets, views cached between requests and patched when loads change."""

    __slots__ = (
        "base",
        "load_version",
        "loads_at",
        "position",
        "rebuilt_at",
        "report_version",
        "server_places",
        "signature",
        "total_inflight",
        "workers",
    )

    def __init__(self, signature: tuple[Any, ...], workers: dict[str, W]) -> None:
        self.signature = signature
        self.workers = workers
        self.base: list[TargetView] = []
        self.position: dict[TargetKey, int] = {}
        # Positions in ``base`` of each multi-rank server's ranks (sibling sums read them).
        self.server_places: dict[str, list[int]] = {}
        self.load_version = -1
        self.loads_at = float("-inf")
        self.rebuilt_at = float("-inf")
        self.report_version = -1
        self.total_inflight = 0


class Router(Generic[W]):
    """Routes requests for every model the registry serves (see the package docstring)."""

    def __init__(
        self,
        registry: RegistryLike[W],
        store: StateStore,
        policy: Policy,
        *,
        seed: int | None = None,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
        block_ids: int = DEFAULT_BLOCK_IDS,
        matched_cap: int = 16,
        reported_load_interval_s: float = 0.25,
        reported_max_age_s: float = 10.0,
        lease_renew_interval_s: float = 30.0,
        decisions_kept: int = 1024,
        clock: Callable[[], float] = time.monotonic,
        role: Role = Role.REGULAR,
        learn_speeds: bool = True,
    ) -> None:
        """``learn_speeds``: measure each worker's prefill speed from the TTFTs it delivers (else
        the registry's speeds are used as they are)."""
        self.registry = registry
        self.store = store
        self.policy = policy
        self.role = role
        self._rng = random.Random(seed)
        self._block_bytes = block_bytes
        self._block_ids = block_ids
        self._matched_cap = matched_cap
        self._reported_interval = reported_load_interval_s
        self._reported_max_age = reported_max_age_s
        self._renew_interval = lease_renew_interval_s
        self._clock = clock
        self._tables: dict[str, _Table[W]] = {}
        self._sequence: dict[str, int] = {}
        self._decisions: deque[dict[str, Any]] = deque(maxlen=decisions_kept)
        self._bytes_per_token: dict[str, float] = {}  # per worker URL, and per model under "model:"
        self._capacity_scale: dict[TargetKey, float] = {}
        self._learn_speeds = learn_speeds
        self._speeds: dict[str, _Speed] = {}  # per worker URL
        # Workers whose learned speed moved since their views were last refreshed.
        self._speed_moved: set[str] = set()
        self._report_version: Callable[[], int] | None = None
        self._report_changes: Callable[[int], Sequence[TargetKey] | None] | None = None
        changes = getattr(registry, "report_changes_since", None)
        if callable(changes) and hasattr(registry, "report_version"):
            self._report_version = lambda: int(registry.report_version)
            self._report_changes = changes
        # Per target: the last request routed there.
        self._last_arrival: dict[TargetKey, _LastArrival] = {}
        # Finished requests that taught the prefill speed nothing, by why (admin status).
        self._speed_skipped = {"no_report": 0, "queued": 0, "short": 0, "joined": 0}
        self._live: weakref.WeakSet[Route[W]] = weakref.WeakSet()
        # Per target, this Router's requests in flight there: route id -> stamp of its record, in
        # routing order (so the first is the oldest).
        self._open: dict[TargetKey, OrderedDict[int, int]] = {}
        self._renewed_at = clock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._start_lock = asyncio.Lock()

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        async with self._start_lock:
            if not self._started:
                await self.store.start()
                self._started = True
                if 0 < self._renew_interval < math.inf:
                    self._spawn(self._renew_loop())

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.store.aclose()
        self._started = False

    # -- estimates -------------------------------------------------------------------------------

    def bytes_per_token(self, worker_url: str | None, model: str) -> float:
        if worker_url is not None:
            value = self._bytes_per_token.get(worker_url)
            if value is not None:
                return value
        return self._bytes_per_token.get("model:" + model, _DEFAULT_BYTES_PER_TOKEN)

    def _learn_bytes_per_token(self, key: str, observed: float) -> None:
        low, high = _BYTES_PER_TOKEN_RANGE
        observed = min(max(observed, low), high)
        old = self._bytes_per_token.get(key)
        self._bytes_per_token[key] = (
            observed if old is None else old + _BYTES_PER_TOKEN_ALPHA * (observed - old)
        )

    def _tokens_per_block(self, blocks: PromptBlocks, worker_url: str | None, model: str) -> float:
        if blocks.unit == "ids":
            return float(blocks.block_size)
        return blocks.block_size / self.bytes_per_token(worker_url, model)

    def _budget_blocks(self, model: str, worker: W, target: TargetKey) -> int:
        tokens_per_block = self._block_bytes / self.bytes_per_token(worker.url, model)
        scale = self._capacity_scale.get(target, 1.0)
        capacity = worker.max_total_num_tokens
        if capacity <= 0:  # the server did not say: assume a typical DeepSeek rank's KV pool
            capacity = _UNKNOWN_CAPACITY_TOKENS
        return max(int(capacity * scale / tokens_per_block), 1)

    # -- snapshot --------------------------------------------------------------------------------

    def _table(self, model: str, workers: Sequence[W], state: ModelState) -> _Table[W]:
        # Registry workers are immutable and swapped on change, so identities tell whether the set
        # changed; the table keeps them referenced, so an id cannot be reused meanwhile.
        signature = tuple(map(id, workers))
        table = self._tables.get(model)
        now = self._clock()
        if table is None or table.signature != signature:
            table = _Table(signature, {w.url: w for w in workers})
            self._tables[model] = table
            self._rebuild(model, table, state, now)
            self._set_budgets(model, table, state)
            return table
        if now - table.loads_at >= self._reported_interval and not self._refresh_reports(table, state, now):
            self._rebuild(model, table, state, now)
            return table
        changed = state.changed_since(table.load_version)
        if changed is None:
            self._rebuild(model, table, state, now)
        elif changed:
            keys = set(changed)
            for key in keys:
                position = table.position.get(key)
                if position is not None:
                    self._patch(table, position, state)
            self._sync_siblings(table, {key.worker for key in keys})
            table.load_version = state.version
        return table

    def _sync_siblings(self, table: _Table[W], urls: Iterable[str]) -> None:
        """Set each DP rank's ``sibling_prefill_tokens`` (the queued prefill of its server's other
        ranks) for the servers in ``urls``; views are replaced only where the sum moved."""
        base = table.base
        for url in urls:
            places = table.server_places.get(url)
            if places is None:
                continue
            own = [cost.queued_prefill_tokens(base[place]) for place in places]
            total = sum(own)
            for place, queued in zip(places, own, strict=True):
                view = base[place]
                if view.sibling_prefill_tokens != total - queued:
                    base[place] = msgspec.structs.replace(view, sibling_prefill_tokens=total - queued)

    def _refresh_reports(self, table: _Table[W], state: ModelState, now: float) -> bool:
        """Re-view only the targets whose server report changed (or whose worker's learned speed
        moved) since the table last looked; False when only a full rebuild will do. A full rebuild
        of 1,024 targets takes milliseconds: every reported-load interval it landed on one request
        as a decision-latency spike. Every ``reported_max_age_s`` the table is rebuilt anyway, so a
        server that stopped reporting has its last report dropped as stale."""
        if self._report_changes is None or self._report_version is None:
            return False
        if now - table.rebuilt_at >= self._reported_max_age:
            return False
        version = self._report_version()
        changed = self._report_changes(table.report_version)
        if changed is None:
            return False
        keys = set(changed)
        moved = [url for url in self._speed_moved if url in table.workers] if self._speed_moved else []
        for url in moved:
            self._speed_moved.discard(url)
            keys.update(TargetKey(url, rank) for rank in range(max(table.workers[url].dp_size, 1)))
        for key in keys:
            position = table.position.get(key)
            if position is None:
                continue
            old = table.base[position]
            view = self._view(table.workers[key.worker], key, state)
            table.total_inflight += view.inflight_requests - old.inflight_requests
            table.base[position] = view
        self._sync_siblings(table, {key.worker for key in keys})
        table.report_version = version
        table.loads_at = now
        return True

    def _view(self, worker: W, key: TargetKey, state: ModelState) -> TargetView:
        load = state.loads.get(key)
        reported = self.registry.reported_load(key)
        # Speeds: measured ones over the registry's seeds (a stale report's step is still a speed).
        step = _attr_float(reported, "decode_step_s")
        learned = self._speeds.get(worker.url)
        age = _attr_float(reported, "age_s")
        if age is not None and age > self._reported_max_age:
            reported = None  # the server stopped answering load polls; its last word is stale
        return TargetView(
            key=key,
            role=worker.role,
            dp_size=worker.dp_size,
            capacity_tokens=worker.max_total_num_tokens,
            prefill_tokens_per_s=worker.prefill_tokens_per_s if learned is None else learned.tokens_per_s,
            decode_step_s=worker.decode_step_s if step is None or step <= 0 else step,
            inflight_requests=load.requests if load is not None else 0,
            inflight_prefill_tokens=load.prefill_tokens if load is not None else 0,
            reported_waiting=_attr_int(reported, "num_waiting_reqs", "waiting"),
            reported_running=_attr_int(reported, "num_running_reqs", "running"),
            reported_token_usage=_attr_float(reported, "token_usage"),
            reported_waiting_tokens=_attr_int(
                reported, "num_waiting_uncached_tokens", "waiting_uncached_tokens"
            ),
        )

    def _rebuild(self, model: str, table: _Table[W], state: ModelState, now: float) -> None:
        views: list[TargetView] = []
        for url in sorted(table.workers):
            worker = table.workers[url]
            for rank in range(max(worker.dp_size, 1)):
                key = TargetKey(url, rank)
                views.append(self._view(worker, key, state))
        table.base = views
        table.position = {view.key: i for i, view in enumerate(views)}
        places: dict[str, list[int]] = {}
        for i, view in enumerate(views):
            if view.dp_size > 1:
                places.setdefault(view.key.worker, []).append(i)
        table.server_places = places
        self._sync_siblings(table, places)
        table.total_inflight = sum(view.inflight_requests for view in views)
        table.load_version = state.version
        table.loads_at = table.rebuilt_at = now
        if self._speed_moved:
            self._speed_moved.difference_update(table.workers)
        if self._report_version is not None:
            table.report_version = self._report_version()

    def _set_budgets(self, model: str, table: _Table[W], state: ModelState, url: str | None = None) -> None:
        """Bound each target's index entries by its KV capacity (in blocks at the learned bytes/token)."""
        for view in table.base:
            if url is None or view.key.worker == url:
                worker = table.workers[view.key.worker]
                state.index.set_budget(view.key, self._budget_blocks(model, worker, view.key))

    def _patch(self, table: _Table[W], position: int, state: ModelState) -> None:
        old = table.base[position]
        load = state.loads.get(old.key)
        requests = load.requests if load is not None else 0
        tokens = load.prefill_tokens if load is not None else 0
        if requests != old.inflight_requests or tokens != old.inflight_prefill_tokens:
            table.total_inflight += requests - old.inflight_requests
            table.base[position] = msgspec.structs.replace(
                old, inflight_requests=requests, inflight_prefill_tokens=tokens
            )

    # -- routing ---------------------------------------------------------------------------------

    async def route(self, req: RoutingRequest) -> Route[W]:
        if not self._started:
            await self.start()
        model = req.model
        workers = self.registry.workers(model=model, role=self.role, healthy_only=True)
        if not workers:
            if model not in self.registry.models():
                raise UnknownModel(f"The model '{model}' does not exist")
            raise NoHealthyWorker(f"no healthy server for model '{model}'")
        state = await self.store.ready(model)
        table = self._table(model, workers, state)
        views = table.base
        if req.exclude:
            views = [v for v in views if v.key.worker not in req.exclude]
            if not views:
                raise NoHealthyWorker(f"no healthy server for model '{model}' left to retry on")

        blocks, batch = prompt_blocks(req, block_bytes=self._block_bytes, block_ids=self._block_ids)
        if blocks.unit == "ids":
            prompt_tokens = blocks.length * batch
        else:
            prompt_tokens = int(blocks.length * batch / self.bytes_per_token(None, model)) + 1
        features = RequestFeatures(
            model=model,
            prompt_tokens=prompt_tokens,
            max_new_tokens=req.max_new_tokens if req.max_new_tokens is not None else _DEFAULT_MAX_NEW_TOKENS,
            stream=req.stream,
            block_hashes=blocks.hashes,
            block_tokens=int(self._tokens_per_block(blocks, None, model)),
        )

        targets = list(views)
        position = table.position if views is table.base else {v.key: i for i, v in enumerate(views)}
        matched: list[int] = []
        match_blocks: dict[TargetKey, int] = {}
        learned = self._bytes_per_token
        model_bpt = self.bytes_per_token(None, model)
        rotate = self._rng.getrandbits(32)
        for match in state.index.match(blocks.hashes, limit=self._matched_cap, rotate=rotate):
            i = position.get(match.target)
            if i is None:
                continue
            view = targets[i]
            if blocks.unit == "ids":
                tokens = match.blocks * blocks.block_size
            else:
                tokens = int(match.blocks * blocks.block_size / learned.get(view.key.worker, model_bpt))
            targets[i] = msgspec.structs.replace(view, predicted_cached_tokens=min(tokens, prompt_tokens))
            matched.append(i)
            match_blocks[match.target] = match.blocks

        sequence = self._sequence.get(model, 0)
        snapshot = Snapshot(
            targets=tuple(targets),
            sequence=sequence,
            matched=tuple(matched),
            mean_inflight_requests=table.total_inflight / len(table.base),
        )
        try:
            decision = self.policy.decide(features, snapshot, self._rng)
        except NoTarget as exc:
            raise NoHealthyWorker(str(exc)) from exc
        self._sequence[model] = sequence + 1

        # Fallbacks matter only when another process may take the first choice meanwhile.
        ranked = (decision.target, *decision.alternatives) if self.store.shared else (decision.target,)
        by_key = {k: targets[position[k]] for k in ranked if k in position}
        choices = _choices_with_headroom(features, list(by_key.values()))
        # Recency stamps of the blocks the first choice holds, before this request refreshes them:
        # finish() reads them to tell what the server must have evicted if it reports a shorter hit.
        first = decision.target
        prior_stamps = state.index.stamps(first, blocks.hashes[: match_blocks.get(first, 0)])
        chosen_view = by_key[decision.target]
        # A batch on a multi-rank server is not pinned: SGLang takes one routed_dp_rank per request
        # and spreads a batch over its ranks itself. Its blocks then land on ranks routing cannot
        # know, so they are not indexed on the chosen rank, and its cached-token report is no
        # evidence about that rank's cache.
        unpinned = (
            _spread_by_server(req, batch, self.role) and table.workers[decision.target.worker].dp_size > 1
        )
        # The prompt counts as queued prefill there until it is expected done (with margin): after
        # that it is decoding, and the server's own load reports tell of any queue left.
        expected_ttft = cost.ttft_s(features, chosen_view)
        lease = await self.store.reserve(
            model,
            choices,
            prefill_tokens=max(prompt_tokens - chosen_view.predicted_cached_tokens, 1),
            blocks=() if unpinned else blocks.hashes,
            prefill_s=_PREFILL_MARGIN * expected_ttft + _PREFILL_SLACK_S,
        )
        if lease.target != decision.target:
            moved = by_key[lease.target]
            decision = msgspec.structs.replace(
                decision,
                target=lease.target,
                predicted_cached_tokens=moved.predicted_cached_tokens,
                predicted_ttft_s=None,
                reason=f"{decision.reason}; first choice filled up meanwhile, took #{lease.choice + 1}",
            )
        worker = table.workers[lease.target.worker]
        unpinned = _spread_by_server(req, batch, self.role) and worker.dp_size > 1
        dp_rank = lease.target.dp_rank if worker.dp_size > 1 and not unpinned else None
        headers = [("x-cachet-worker", worker.url)]
        if not unpinned:
            headers.append(("x-cachet-dp-rank", str(lease.target.dp_rank)))
        headers += [
            ("x-cachet-cached-tokens", str(decision.predicted_cached_tokens)),
            ("x-cachet-reason", _header_safe(decision.reason)),
            ("x-cachet-policy", decision.policy),
        ]
        route: Route[W] = Route(
            decision,
            worker,
            dp_rank,
            headers,
            lease=lease,
            blocks=blocks,
            predicted_blocks=0 if unpinned else match_blocks.get(lease.target, 0),
            prior_stamps=prior_stamps if lease.target == first and not unpinned else (),
        )
        self._live.add(route)
        if self._learn_speeds:
            self._note_arrival(route, by_key[lease.target], batch == 1 and lease.choice == 0)
        open_here = self._open.setdefault(lease.target, OrderedDict())
        if lease.target == first:
            # The oldest blocks there that may not be prefilled yet: recorded by this gateway's
            # requests still open there, or by other gateways' requests lately.
            own = next(iter(open_here.values()), None)
            remote = self.store.unsettled_since(model, first)
            route._settled_below = own if remote is None else remote if own is None else min(own, remote)
        if blocks.hashes and not unpinned:
            recorded = state.index.stamps(lease.target, blocks.hashes[:1])
            if recorded:
                open_here[id(route)] = recorded[0]
        self._decisions.append(
            {
                "model": model,
                "worker": worker.url,
                "dp_rank": None if unpinned else lease.target.dp_rank,
                "policy": decision.policy,
                "reason": decision.reason,
                "prompt_tokens": prompt_tokens,
                "predicted_cached_tokens": decision.predicted_cached_tokens,
                "predicted_ttft_s": decision.predicted_ttft_s,
                "candidates": len(targets),
            }
        )
        self._maybe_renew()
        return route

    def _note_arrival(self, route: Route[W], view: TargetView, single: bool) -> None:
        """Note what was queued ahead of this request on its target, if it is known: nothing, or
        only the requests routed there just before it (SGLang prefills them in one batch). Behind
        anything else its TTFT says nothing reliable about the target's speed."""
        target = route._lease.target
        now = self._clock()
        last = self._last_arrival.get(target)
        if last is None:
            last = self._last_arrival[target] = _LastArrival()
        if last.cell[0] == math.inf:
            last.cell[0] = now
        queued = cost.queued_prefill_tokens(view)
        if cost.running_requests(view) > 0:
            route._decode_wait_s = 0.5 * view.decode_step_s
        if queued == 0 and not view.reported_waiting:
            route._quiet = single
        elif now <= last.join_until and queued == last.through:
            route._quiet = single  # a burst: its batch is the previous requests' and its own
        route._queued_ahead = queued
        route._routed_at = now
        route._next_arrival = last.cell = [math.inf]
        last.at = now
        last.join_until = now + 2.0 * route._decode_wait_s + _JOIN_SLACK_S
        last.through = queued + route._lease.prefill_tokens if route._quiet else -1

    def _learn_prefill_speed(self, route: Route[W], outcome: Outcome) -> None:
        """One finished request's evidence of its worker's prefill speed (tokens/s per rank).

        Informative only if what was queued ahead of it when routed is known — nothing (no
        leases' prefill, no waiting in the server's last report), or just the requests of a burst
        routed there within the join window before it, which SGLang prefills in the same batch —
        if no request routed there after it may have joined its batch (see ``_JOIN_SLACK_S``), and
        if that batch had at least 1,024 uncached tokens. Then speed ≈ (queued ahead + uncached) /
        (TTFT − the decode-step wait the cost model adds when a batch runs): the cost model's own
        formula. Chunked prefill needs nothing special: SGLang runs a long prompt's chunks back to
        back (the decode batch waits), so the ratio is the chunk rate, the rate queued tokens drain
        at too. A target busy with anything else teaches nothing rather than too low a speed (a
        request queued behind one already prefilling would also over-count that one's finished
        part); what the checks cannot see (another gateway replica's or client's request landing
        alongside, a DP-attention peer rank prefilling) is bounded by the clamped step.
        """
        ttft = outcome.ttft_s
        prompt = outcome.prompt_tokens
        cached = outcome.cached_tokens
        if ttft is None or ttft <= 0 or prompt is None or cached is None:
            self._speed_skipped["no_report"] += 1
            return
        work = route._queued_ahead + prompt - cached
        if work < _SPEED_MIN_UNCACHED:
            self._speed_skipped["short"] += 1
            return
        worker = route.worker
        window = ttft
        if work <= _CHUNK_TOKENS // max(worker.dp_size, 1):
            window = min(window, 2.0 * route._decode_wait_s + _JOIN_SLACK_S)
        if route._next_arrival[0] < route._routed_at + window:
            self._speed_skipped["joined"] += 1
            return
        seconds = max(ttft - route._decode_wait_s, 0.5 * ttft)
        speed = self._speeds.get(worker.url)
        if speed is None:
            speed = self._speeds[worker.url] = _Speed(worker.prefill_tokens_per_s)
        old = speed.tokens_per_s
        pull = math.log(work / seconds / old)
        pull = min(max(pull, -_SPEED_MAX_PULL), _SPEED_MAX_PULL)
        low, high = _SPEED_RANGE
        speed.tokens_per_s = min(max(old * math.exp(_SPEED_ALPHA * pull), low), high)
        speed.samples += 1
        self._speed_moved.add(worker.url)

    def _maybe_renew(self) -> None:
        """Renew open leases when the renewal interval has passed on the Router's clock (which may
        be a replay's virtual clock); ``_renew_loop`` covers idle stretches in real time."""
        now = self._clock()
        if now - self._renewed_at < self._renew_interval:
            return
        self._renewed_at = now
        live = [route for route in self._live if not route._finished]
        # Routes dropped without finish() must not hold back index corrections forever.
        alive = {id(route) for route in live}
        for open_here in self._open.values():
            for stale in [key for key in open_here if key not in alive]:
                del open_here[stale]
        leases = [route._lease for route in live]
        if leases:
            self._spawn(self.store.renew(leases))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self._renew_interval)
            self._maybe_renew()

    async def finish(self, route: Route[W], outcome: Outcome) -> None:
        if route._finished:
            return
        route._finished = True
        self._live.discard(route)
        if route._quiet and outcome.ok:
            self._learn_prefill_speed(route, outcome)
        elif self._learn_speeds and outcome.ok:
            self._speed_skipped["queued"] += 1
        open_here = self._open.get(route._lease.target)
        if open_here is not None:
            open_here.pop(id(route), None)
        lease = route._lease
        model = lease.model
        blocks = route._blocks
        worker = route.worker
        if blocks.unit == "bytes" and outcome.prompt_tokens and blocks.length > 0:
            observed = blocks.length / outcome.prompt_tokens
            if observed > 0:
                self._learn_bytes_per_token(worker.url, observed)
                self._learn_bytes_per_token("model:" + model, observed)
                table = self._tables.get(model)
                index = self.store.model(model).index
                wanted = self._budget_blocks(model, worker, lease.target)
                if table is not None and abs(wanted / index.budget(lease.target) - 1) > 0.05:
                    # The capacity in blocks moved noticeably: re-bound this worker's targets.
                    self._set_budgets(model, table, self.store.model(model), worker.url)

        forget: Iterable[int] = ()
        forget_through: int | None = None
        target = lease.target
        scale = self._capacity_scale.get(target, 1.0)
        new_scale = scale
        tokens_per_block = self._tokens_per_block(blocks, worker.url, model)
        predicted_blocks = route._predicted_blocks
        # A request that produced no token at all may have been refused before the server looked at
        # its cache (prompt over the context length, aborted while queued): its "0 cached" is no
        # evidence of eviction — in the Mooncake replay eight such 191k-token prompts each wiped a
        # target's whole index — and the server holds none of its blocks.
        refused = outcome.completion_tokens == 0 and outcome.ttft_s is None
        if outcome.cached_tokens is not None and not refused:
            cached_blocks = int(outcome.cached_tokens / tokens_per_block)
            # Slack for the bytes-per-token estimate and page alignment: 2 blocks and 10 %.
            short = cached_blocks + 2 + predicted_blocks // 10 <= predicted_blocks
            lost_stamp = (
                route._prior_stamps[cached_blocks] if cached_blocks < len(route._prior_stamps) else None
            )
            settled = route._settled_below
            if short and lost_stamp is not None and (settled is None or lost_stamp < settled):
                # Strict LRU on the server: what it lost first, it had not used since then.
                forget_through = lost_stamp
                new_scale = max(scale * _SHRINK, _MIN_SCALE)
            elif predicted_blocks > 0 and not short:
                new_scale = min(scale * _RECOVER, 1.0)
            if not outcome.ok:
                forget = blocks.hashes[max(cached_blocks, predicted_blocks) :]
        elif not outcome.ok or refused:
            forget = blocks.hashes[predicted_blocks:]
        await self.store.release(lease, forget=forget, forget_through_stamp=forget_through)
        if new_scale != scale:
            self._capacity_scale[target] = new_scale
            self.store.model(model).index.set_budget(target, self._budget_blocks(model, worker, target))

    def status(self) -> dict[str, Any]:
        """Routing state for the admin API: the policy, the store's health and counters, and what
        the Router has learned (bytes per token, shrunken cache-capacity estimates, speeds)."""
        return {
            "policy": self.policy.name,
            "store": dict(self.store.status()),
            "routed": dict(self._sequence),
            "open_routes": sum(1 for route in self._live if not route._finished),
            "bytes_per_token": {key: round(value, 3) for key, value in self._bytes_per_token.items()},
            "capacity_scale": {
                target.label(): round(scale, 3)
                for target, scale in self._capacity_scale.items()
                if scale < 1.0
            },
            "speeds": self.speeds(),
            "prefill_speed_learning": {
                "learning": self._learn_speeds,
                "workers": {
                    url: {
                        "prefill_tokens_per_s": round(speed.tokens_per_s, 1),
                        "seed_tokens_per_s": round(speed.seed, 1),
                        "samples": speed.samples,
                    }
                    for url, speed in self._speeds.items()
                },
                "skipped": dict(self._speed_skipped),
            },
        }

    def speeds(self) -> dict[str, dict[str, float]]:
        """Per target (``url@rank``): the speeds routing decides with now — prefill tokens/s (learned
        from TTFTs, else the registry's seed) and decode step seconds (measured from the server's
        load reports, else the seed) — as of the last view rebuild (at most 0.25 s old)."""
        out: dict[str, dict[str, float]] = {}
        for table in self._tables.values():
            for view in table.base:
                out[view.key.label()] = {
                    "prefill_tokens_per_s": round(view.prefill_tokens_per_s, 1),
                    "decode_step_s": round(view.decode_step_s, 5),
                }
        return out

    def recent_decisions(self, limit: int) -> list[dict[str, Any]]:
        if limit <= 0:
            return []
        items = list(self._decisions)[-limit:]
        items.reverse()
        return items
