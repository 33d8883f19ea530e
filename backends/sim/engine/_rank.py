"""One DP rank's scheduler: SGLang's continuous batching over a radix cache, stepped by the caller.

Policy (SGLang defaults): FCFS waiting queue; a step runs a prefill (extend) batch whenever one can be
formed — the unfinished chunked request first, then new requests while the chunk budget,
``max_running_requests`` and KV memory allow — and otherwise one decode step for every running request.
Prefill and decode are not mixed in one step (SGLang's ``--enable-mixed-chunk`` is off by default), so long
prefills pause decoding, as on a real server.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from backends.sim.engine._radix import RadixCache, RadixNode
from backends.sim.engine._textgen import TextGenerator
from backends.sim.engine._types import (
    Event,
    FinishReason,
    RankLoad,
    RequestFinished,
    RequestScheduled,
    SimRequest,
    StepResult,
    TokensGenerated,
)

if TYPE_CHECKING:
    from backends.sim.engine._perf import PerfModel
    from backends.sim.engine._presets import DisaggregationMode

# SGLang's admission control reserves room for future decode tokens: min(max_new_tokens, 4096) times a ratio
# that starts at 0.7 x schedule_conservativeness, decays linearly to 0.14 of that over 600 decode steps, and
# jumps back up after a retraction.
_CLIP_MAX_NEW_TOKENS = 4096
_INIT_NEW_TOKEN_RATIO = 0.7
_MIN_NEW_TOKEN_RATIO_FACTOR = 0.14
_NEW_TOKEN_RATIO_DECAY_STEPS = 600
_THROUGHPUT_WINDOW_STEPS = 40
_ABORT_MESSAGE = "Aborted by AbortReq."


class _Req:
    __slots__ = (
        "arrival",
        "cached_tokens",
        "input_ids",
        "kv_len",
        "max_new_tokens",
        "node",
        "output_ids",
        "prefilled",
        "ready_at",
        "rid",
        "scheduled",
        "stop_ids",
        "stop_strings",
        "stream",
        "tail_text",
        "tree_len",
        "uncached_estimate",
    )

    def __init__(
        self, request: SimRequest, arrival: int, max_new_tokens: int, stop_ids: frozenset[int]
    ) -> None:
        self.rid = request.rid
        self.input_ids = request.input_ids
        self.max_new_tokens = max_new_tokens
        self.stop_ids = stop_ids
        self.stop_strings = request.stop_strings
        self.prefilled = request.prefilled
        self.arrival = arrival
        self.output_ids: list[int] = []
        self.cached_tokens = 0
        self.scheduled = False
        self.node: RadixNode | None = None  # locked radix path this request's KV prefix lives in
        self.tree_len = 0  # tokens of its KV held by the radix tree (under ``node``)
        self.kv_len = 0  # tokens of its KV computed so far (tree part + private part)
        self.ready_at = 0.0  # PD decode: when the KV transfer completes
        self.stream = 0  # output stream key (TextGenerator)
        self.tail_text = ""
        self.uncached_estimate = 0

    def fill_ids(self) -> list[int]:
        """Tokens whose KV a (re-)prefill must hold: the prompt, plus any output kept across a retraction."""
        return self.input_ids + self.output_ids if self.output_ids else self.input_ids


class RankEngine:
    """The scheduler of one DP rank. Pure: the caller supplies time by waiting ``StepResult.duration_s``."""

    def __init__(
        self,
        *,
        dp_rank: int,
        perf: PerfModel,
        text: TextGenerator,
        max_total_num_tokens: int,
        max_running_requests: int,
        chunked_prefill_size: int | None,
        max_prefill_tokens: int,
        page_size: int,
        context_length: int,
        disaggregation_mode: DisaggregationMode,
        disable_radix_cache: bool,
        schedule_conservativeness: float = 1.0,
        others_batch_tokens: Callable[[RankEngine], int] | None = None,
    ) -> None:
        self.dp_rank = dp_rank
        self.perf = perf
        self._text = text
        self.max_total_num_tokens = max_total_num_tokens
        self.max_running_requests = max_running_requests
        self.chunked_prefill_size = chunked_prefill_size
        self.max_prefill_tokens = max_prefill_tokens
        self.page_size = page_size
        self.disaggregation_mode = disaggregation_mode
        # SGLang: max_req_len = min(context_len - 1, max_total_num_tokens - 1); inputs get 5 tokens less.
        self.max_req_len = min(context_length - 1, max_total_num_tokens - 1)
        self.max_req_input_len = self.max_req_len - 5
        # Decode servers keep no radix cache by default (--disaggregation-decode-enable-radix-cache is off).
        self._use_cache = not disable_radix_cache and disaggregation_mode != "decode"
        self._others_batch_tokens = others_batch_tokens
        self.tree = RadixCache(page_size)
        self._private_tokens = 0  # KV tokens held by requests outside the tree
        self._requests: dict[str, _Req] = {}
        self._waiting: deque[_Req] = deque()
        self._waiting_uncached = 0
        self._running: dict[str, _Req] = {}
        self._chunked: _Req | None = None
        self._transfers: list[_Req] = []
        self._link_free_at = 0.0
        self._pending: list[Event] = []
        self._arrivals = 0
        self._now = 0.0
        self._init_new_token_ratio = min(_INIT_NEW_TOKEN_RATIO * schedule_conservativeness, 1.0)
        self._min_new_token_ratio = min(self._init_new_token_ratio * _MIN_NEW_TOKEN_RATIO_FACTOR, 1.0)
        self._new_token_ratio_decay = (
            self._init_new_token_ratio - self._min_new_token_ratio
        ) / _NEW_TOKEN_RATIO_DECAY_STEPS
        self._new_token_ratio = self._init_new_token_ratio
        self.last_batch_tokens = 0
        self._last_hit_rate = 0.0
        self._gen_window: deque[tuple[int, float]] = deque(maxlen=_THROUGHPUT_WINDOW_STEPS)
        self.num_retractions = 0

    # -- requests in and out ---------------------------------------------------------------------------------

    def add(self, request: SimRequest) -> None:
        """Queue a request. Raises ValueError for a duplicate rid, empty input or negative max_new_tokens."""
        if request.rid in self._requests:
            raise ValueError(f"Duplicate request ID detected: {request.rid}")
        if not request.input_ids:
            raise ValueError("input_ids must not be empty")
        if request.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        prompt_len = len(request.input_ids)
        if self.disaggregation_mode == "prefill":
            max_new = 1
        else:
            max_new = max(0, min(request.max_new_tokens, self.max_req_len - prompt_len - 1))
        stop_ids = frozenset(request.stop_token_ids)
        if not request.ignore_eos:
            stop_ids |= {self._text.eos_token_id}
        else:
            stop_ids = frozenset()
        req = _Req(request, self._arrivals, max_new, stop_ids)
        self._arrivals += 1
        req.stream = self._text.stream_key(request.input_ids)
        if prompt_len > self.max_req_input_len:
            message = (
                f"Input length ({prompt_len} tokens) exceeds the maximum allowed length "
                f"({self.max_req_input_len} tokens). Use a shorter input or enable --allow-auto-truncate."
            )
            self._pending.append(
                RequestFinished(
                    req.rid, FinishReason("abort", message=message, status_code=400), prompt_len, 0, 0
                )
            )
            return
        self._requests[req.rid] = req
        if self._use_cache and request.prefilled is None:
            cached = self.tree.peek(request.input_ids[: prompt_len - 1])
        else:
            cached = 0
        req.uncached_estimate = prompt_len - cached
        self._waiting_uncached += req.uncached_estimate
        self._waiting.append(req)

    def abort(self, rid: str) -> bool:
        """Abort a queued or running request; its RequestFinished(abort) comes with the next step's events."""
        req = self._requests.pop(rid, None)
        if req is None:
            return False
        if req in self._waiting:
            self._waiting.remove(req)
            self._waiting_uncached -= req.uncached_estimate
        else:
            self._running.pop(rid, None)
            if self._chunked is req:
                self._chunked = None
            if req in self._transfers:
                self._transfers.remove(req)
            self._release(req, cache=False)
        self._pending.append(
            RequestFinished(
                rid,
                FinishReason("abort", message=_ABORT_MESSAGE),
                len(req.input_ids),
                len(req.output_ids),
                req.cached_tokens,
            )
        )
        return True

    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._chunked or self._transfers or self._pending)

    def flush_cache(self) -> bool:
        """Empty the radix cache; refused (False) while any request is queued or running, as in SGLang."""
        if self._requests or self._chunked or self._transfers:
            return False
        self.tree.reset()
        return True

    def load(self) -> RankLoad:
        used = self._private_tokens + self.tree.protected_size
        recent = [t for t, _ in self._gen_window]
        elapsed = sum(d for _, d in self._gen_window)
        return RankLoad(
            num_running_reqs=len(self._running) + len(self._transfers) + (1 if self._chunked else 0),
            num_waiting_reqs=len(self._waiting),
            num_waiting_uncached_tokens=self._waiting_uncached,
            num_used_tokens=used,
            max_total_num_tokens=self.max_total_num_tokens,
            token_usage=used / self.max_total_num_tokens,
            cache_hit_rate=self._last_hit_rate,
            gen_throughput=sum(recent) / elapsed if elapsed > 0 else 0.0,
        )

    @property
    def occupied_kv_tokens(self) -> int:
        """KV slots in use, cached-but-evictable entries included; never above max_total_num_tokens."""
        return self.tree.total_size + self._private_tokens

    @property
    def now(self) -> float:
        """Seconds of modelled GPU time this rank has spent (sum of step durations)."""
        return self._now

    # -- memory ----------------------------------------------------------------------------------------------

    def _free_tokens(self) -> int:
        return self.max_total_num_tokens - self.tree.total_size - self._private_tokens

    def _ensure_free(self, tokens: int) -> bool:
        """Make ``tokens`` KV slots free, evicting unreferenced cache if needed."""
        free = self._free_tokens()
        if free < tokens:
            self.tree.evict(tokens - free)
            free = self._free_tokens()
        return free >= tokens

    def _cache_prefix(self, req: _Req) -> None:
        """Move the request's computed KV into the tree (SGLang's cache_unfinished_req); re-lock its path."""
        if not self._use_cache:
            return
        key = req.fill_ids()[: req.kv_len]
        _, node = self.tree.insert(key)
        aligned = len(key) - len(key) % self.page_size
        self._private_tokens -= aligned - req.tree_len
        self.tree.lock(node)
        if req.node is not None:
            self.tree.unlock(req.node)
        req.node = node
        req.tree_len = aligned

    def _release(self, req: _Req, *, cache: bool) -> None:
        """Free a request's KV; with ``cache`` its computed tokens stay in the tree as evictable entries."""
        if cache and self._use_cache and req.kv_len:
            key = req.fill_ids()[: req.kv_len]
            _, node = self.tree.insert(key)
            self.tree.lock(node)
            if req.node is not None:
                self.tree.unlock(req.node)
            req.node = node
        self._private_tokens -= req.kv_len - req.tree_len
        if req.node is not None:
            self.tree.unlock(req.node)
        req.node = None
        req.tree_len = 0
        req.kv_len = 0

    def _decode_reservation(self) -> float:
        ratio = self._new_token_ratio
        total = 0.0
        for req in self._running.values():
            total += min(req.max_new_tokens - len(req.output_ids), _CLIP_MAX_NEW_TOKENS) * ratio
        return total

    # -- the step --------------------------------------------------------------------------------------------

    def step(self) -> StepResult:
        """Run ONE scheduler iteration and say how long it took; deliver its events after that time."""
        events = self._pending
        self._pending = []
        batch = self._schedule_prefill(events)
        if batch:
            duration = self._run_prefill(batch, events)
        elif self._running:
            duration = self._run_decode(events)
        elif self._transfers:
            duration = max(0.0, min(r.ready_at for r in self._transfers) - self._now)
            self.last_batch_tokens = 0
        else:
            duration = 0.0
            self.last_batch_tokens = 0
        self._now += duration
        if self._transfers:
            self._complete_transfers(events)
        return StepResult(duration, events)

    def _others(self) -> int:
        return self._others_batch_tokens(self) if self._others_batch_tokens is not None else 0

    def _schedule_prefill(self, events: list[Event]) -> list[tuple[_Req, int, int]]:
        """Pick this step's prefill chunks: (request, new tokens, tokens already in KV)."""
        chunk_budget = self.chunked_prefill_size if self.chunked_prefill_size else 1 << 62
        input_budget = self.max_prefill_tokens
        batch: list[tuple[_Req, int, int]] = []
        if self._chunked is not None:
            req = self._chunked
            remaining = len(req.fill_ids()) - req.kv_len
            take = self._chunk_size(remaining, chunk_budget)
            if take <= 0 or not self._ensure_free(take):
                return []
            batch.append((req, take, req.kv_len))
            req.kv_len += take
            self._private_tokens += take
            chunk_budget -= take
            input_budget -= take
            if req.kv_len >= len(req.fill_ids()):
                self._chunked = None
        occupied = len(self._running) + len(self._transfers) + len(batch)
        reservation = self._decode_reservation() if self._waiting else 0.0
        hit_tokens = 0
        input_tokens = 0
        while self._waiting and chunk_budget > 0 and input_budget > 0 and self._chunked is None:
            if occupied >= self.max_running_requests:
                break
            req = self._waiting[0]
            if req.prefilled is not None and self.disaggregation_mode == "decode":
                if not self._admit_prefilled(req, reservation if occupied else None, events):
                    break
                reservation += min(req.max_new_tokens, _CLIP_MAX_NEW_TOKENS) * self._new_token_ratio
                occupied += 1
                continue
            fill = req.fill_ids()
            if self._use_cache:
                prefix_len, node = self.tree.match(fill[: len(fill) - 1])
            else:
                prefix_len, node = 0, self.tree.root
            extend = len(fill) - prefix_len
            future = (
                min(req.max_new_tokens - len(req.output_ids), _CLIP_MAX_NEW_TOKENS) * self._new_token_ratio
            )
            if prefix_len:
                self.tree.lock(node)
            available = self._free_tokens() + self.tree.evictable_size
            take = self._chunk_size(extend, min(chunk_budget, input_budget))
            # An idle rank admits its head request whenever the prompt fits: length caps guarantee the rest.
            needed = extend + (future + reservation if occupied else 0)
            if take <= 0 or needed > available or not self._ensure_free(take):
                if prefix_len:
                    self.tree.unlock(node)
                break
            self._waiting.popleft()
            self._waiting_uncached -= req.uncached_estimate
            req.node = node if prefix_len else None
            req.tree_len = prefix_len
            req.kv_len = prefix_len + take
            self._private_tokens += take
            if not req.scheduled:
                req.scheduled = True
                req.cached_tokens = prefix_len
                events.append(RequestScheduled(req.rid, prefix_len, len(req.input_ids)))
                hit_tokens += prefix_len
                input_tokens += len(req.input_ids)
            batch.append((req, take, prefix_len))
            chunk_budget -= take
            input_budget -= take
            reservation += future
            occupied += 1
            if take < extend:
                self._chunked = req
        if input_tokens:
            self._last_hit_rate = hit_tokens / input_tokens
        return batch

    def _chunk_size(self, remaining: int, budget: int) -> int:
        if remaining <= budget:
            return remaining
        return budget - budget % self.page_size

    def _admit_prefilled(self, req: _Req, reservation: float | None, events: list[Event]) -> bool:
        """PD decode: pre-allocate the prompt's KV and start its transfer from the prefill server.

        ``reservation`` is None on an idle rank, which admits whenever the prompt itself fits.
        """
        assert req.prefilled is not None
        need = len(req.input_ids)
        future = min(req.max_new_tokens, _CLIP_MAX_NEW_TOKENS) * self._new_token_ratio
        extra = 0.0 if reservation is None else future + reservation
        if need + extra > self._free_tokens() + self.tree.evictable_size:
            return False
        if not self._ensure_free(need):
            return False
        self._waiting.popleft()
        self._waiting_uncached -= req.uncached_estimate
        req.kv_len = need
        self._private_tokens += need
        req.scheduled = True
        req.cached_tokens = req.prefilled.cached_tokens
        events.append(RequestScheduled(req.rid, req.cached_tokens, len(req.input_ids)))
        start = max(self._now, self._link_free_at)
        req.ready_at = start + self.perf.kv_transfer_time(req.prefilled.kv_tokens)
        self._link_free_at = req.ready_at
        self._transfers.append(req)
        return True

    def _complete_transfers(self, events: list[Event]) -> None:
        done = [r for r in self._transfers if r.ready_at <= self._now + 1e-12]
        for req in done:
            self._transfers.remove(req)
            assert req.prefilled is not None
            if req.max_new_tokens == 0:
                self._finish(req, FinishReason("length", length=0), events)
                continue
            self._running[req.rid] = req
            self._emit_tokens(req, [req.prefilled.first_token_id], events)

    def _run_prefill(self, batch: list[tuple[_Req, int, int]], events: list[Event]) -> float:
        new_tokens = sum(take for _, take, _ in batch)
        self.last_batch_tokens = new_tokens
        duration = self.perf.prefill_time([(take, prefix) for _, take, prefix in batch], self._others())
        for req, _, _ in batch:
            self._cache_prefix(req)
            if req is self._chunked:
                continue
            if req.max_new_tokens == 0 and not req.output_ids:
                self._finish(req, FinishReason("length", length=0), events)
                continue
            self._running[req.rid] = req
            self._emit_tokens(
                req, [self._next_token(req, req.output_ids[-1] if req.output_ids else None)], events
            )
        return duration

    def _run_decode(self, events: list[Event]) -> float:
        per_req = self.perf.tokens_verified_per_step

        def slots_needed() -> int:
            # MTP verifies up to 1 + draft tokens, but never more than a request may still generate.
            return sum(min(per_req, r.max_new_tokens - len(r.output_ids)) for r in self._running.values())

        while len(self._running) > 1 and not self._ensure_free(slots_needed()):
            self._retract_one()
        if not self._ensure_free(slots_needed()):
            # A lone request that cannot grow: SGLang's length caps (input + output < max_total_num_tokens)
            # make this unreachable; end it cleanly rather than spin.
            req = self._running.pop(next(iter(self._running)))
            self._finish(req, FinishReason("abort", message="KV cache is full", status_code=503), events)
            return 0.0
        batch = len(self._running)
        kv_tokens = 0
        for req in self._running.values():
            kv_tokens += req.kv_len
        self.last_batch_tokens = batch * per_req
        duration = self.perf.decode_time(batch, kv_tokens, self._others())
        generated = 0
        for req in list(self._running.values()):
            accepted = min(
                self._text.accepted_tokens(req.stream, len(req.output_ids), self.perf),
                req.max_new_tokens - len(req.output_ids),
            )
            tokens: list[int] = []
            previous = req.output_ids[-1] if req.output_ids else None
            for _ in range(accepted):
                previous = self._next_token(req, previous, len(tokens))
                tokens.append(previous)
                if self._would_finish(req, len(req.output_ids) + len(tokens), previous):
                    break
            req.kv_len += len(tokens)
            self._private_tokens += len(tokens)
            generated += len(tokens)
            self._emit_tokens(req, tokens, events)
        self._gen_window.append((generated, duration))
        self._new_token_ratio = max(
            self._min_new_token_ratio, self._new_token_ratio - self._new_token_ratio_decay
        )
        return duration

    def _next_token(self, req: _Req, previous: int | None, ahead: int = 0) -> int:
        position = len(req.output_ids) + ahead
        return self._text.next_token(req.stream, position, previous, self._text.eos_token_id in req.stop_ids)

    def _would_finish(self, req: _Req, count: int, token: int) -> bool:
        return count >= req.max_new_tokens or token in req.stop_ids

    def _emit_tokens(self, req: _Req, tokens: list[int], events: list[Event]) -> None:
        """Append tokens, report them, and finish the request if one ends it (SGLang's check order)."""
        kept: list[int] = []
        finish: FinishReason | None = None
        for token in tokens:
            req.output_ids.append(token)
            kept.append(token)
            if len(req.output_ids) >= req.max_new_tokens:
                finish = FinishReason(
                    "length", length=0 if self.disaggregation_mode == "prefill" else req.max_new_tokens
                )
            elif token in req.stop_ids:
                finish = FinishReason("stop", matched=token)
            elif req.stop_strings:
                req.tail_text = (req.tail_text + self._text.token_text(token))[-256:]
                for stop in req.stop_strings:
                    if stop and stop in req.tail_text:
                        finish = FinishReason("stop", matched=stop)
                        break
            if finish is not None:
                break
        events.append(TokensGenerated(req.rid, kept))
        if finish is not None:
            self._running.pop(req.rid, None)
            self._finish(req, finish, events)

    def _finish(self, req: _Req, finish: FinishReason, events: list[Event]) -> None:
        self._requests.pop(req.rid, None)
        self._release(req, cache=True)
        events.append(
            RequestFinished(req.rid, finish, len(req.input_ids), len(req.output_ids), req.cached_tokens)
        )

    def _retract_one(self) -> None:
        """Send the running request with the least output (longest prompt on ties) back to the queue."""
        victim = min(self._running.values(), key=lambda r: (len(r.output_ids), -len(r.input_ids), -r.arrival))
        del self._running[victim.rid]
        self._release(victim, cache=True)
        victim.uncached_estimate = len(victim.fill_ids())
        self._waiting_uncached += victim.uncached_estimate
        position = 0
        for position, queued in enumerate(self._waiting):  # noqa: B007 - keep FCFS order by arrival
            if queued.arrival > victim.arrival:
                break
        else:
            position = len(self._waiting)
        self._waiting.insert(position, victim)
        self.num_retractions += 1
        remaining = sum(r.max_new_tokens for r in self._running.values()) or 1
        decoded = sum(len(r.output_ids) for r in self._running.values())
        self._new_token_ratio = min(1.0, (decoded + 10 * len(self._running)) / remaining)
