"""The server-side generation pipeline, independent of HTTP: admission, rank choice, PD hand-off, events.

Handlers turn a request body into `GenerationInput`s, then iterate `Runtime.generate()` for `Progress`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field

from backends.sim.driver import Event, RankDriver, RequestHandle
from backends.sim.engine import (
    EngineConfig,
    FinishReason,
    PrefilledKV,
    RequestFinished,
    RequestScheduled,
    ServerEngine,
    SimRequest,
    TokensGenerated,
)
from backends.sim.metrics import ServerMetrics
from backends.sim.pd import FAKE_BOOTSTRAP_HOST, KVTransferClient, KVTransferError, RoomTable
from backends.sim.settings import Faults, ServerSettings
from backends.sim.versions import VersionBehaviour, resolve_version

MAX_SEQUENCES_PER_REQUEST = 1024


class RequestError(Exception):
    """A request SGLang refuses; `status` decides the shape (400 = ValueError, 500/503 = HTTPException)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(slots=True)
class Bootstrap:
    host: str
    port: int
    room: int


@dataclass(slots=True)
class GenerationInput:
    rid: str
    input_ids: list[int]
    max_new_tokens: int | None
    stop_strs: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    no_stop_trim: bool = False
    dp_rank: int | None = None
    bootstrap: Bootstrap | None = None
    log_metrics: bool = True


@dataclass(slots=True)
class Progress:
    """The new output since the previous Progress of the same request, plus running totals."""

    new_ids: list[int]
    new_text: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    dp_rank: int
    finish: FinishReason | None = None
    # A stop string that straddles chunks: this many characters of text already handed out must go.
    rollback: int = 0
    timing: Timing | None = None


@dataclass(slots=True)
class Timing:
    """Wall-clock (time.time()) milestones of one request, for --enable-metrics' meta_info fields."""

    received: float
    scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None


@dataclass(slots=True)
class _Tracking:
    driver: RankDriver
    handle: RequestHandle
    arrived: float
    timing: Timing
    first_token_at: float | None = None
    last_token_at: float | None = None


@dataclass
class Runtime:
    settings: ServerSettings
    faults: Faults = field(default_factory=Faults)

    def __post_init__(self) -> None:
        s = self.settings
        self.version: VersionBehaviour = resolve_version(s.sglang_version)
        self.engine_config = EngineConfig(
            preset=s.preset,
            mtp=s.mtp,
            dp_size=s.dp_size,
            page_size=s.page_size,
            max_running_requests=s.max_running_requests,
            chunked_prefill_size=s.chunked_prefill_size,
            max_total_num_tokens=s.max_total_num_tokens,
            context_length=s.context_length,
            rtt_ms=s.rtt_ms,
            disaggregation_mode=s.disaggregation_mode,
            seed=s.seed,
            max_prefill_tokens=s.max_prefill_tokens,
            disable_radix_cache=s.disable_radix_cache,
        )
        self.engine = ServerEngine(self.engine_config)
        self.dp_size: int = self.engine.dp_size
        self.tp_size: int = self.engine.tp_size
        self.tokenizer = self.engine.tokenizer
        self.metrics = ServerMetrics(s, self.version, self.dp_size)
        self.rooms = RoomTable()
        self.kv_client: KVTransferClient | None = None
        self._rng = random.Random(s.seed)
        self._inflight: dict[str, _Tracking] = {}
        self._admitting: dict[str, asyncio.Event] = {}
        self._output_waiters: list[asyncio.Future[None]] = []
        self.hang_released = asyncio.Event()
        if not self.faults.hang:
            self.hang_released.set()
        self.drivers: list[RankDriver] = []
        self.ready = False

    # ---- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        self.drivers = [
            RankDriver(
                rank,
                i,
                time_scale=s.time_scale,
                slowdown=lambda: self.faults.slowdown,
                on_events=self._on_output,
            )
            for i, rank in enumerate(self.engine.ranks)
        ]
        for driver in self.drivers:
            driver.start()
        if s.disaggregation_mode == "decode":
            self.kv_client = KVTransferClient()

    async def warm_up(self) -> None:
        """SGLang sends one warm-up generate before it reports healthy; so do we."""
        if self.settings.startup_delay_s > 0:
            await asyncio.sleep(self.settings.startup_delay_s)
        await self.probe(timeout_s=max(self.settings.health_check_timeout_s, 60.0))
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        for driver in self.drivers:
            await driver.stop()
        if self.kv_client is not None:
            await self.kv_client.aclose()
        self.rooms.close()

    def set_faults(self, faults: Faults) -> None:
        self.faults = faults
        if faults.hang:
            self.hang_released.clear()
        else:
            self.hang_released.set()

    # ---- queries ---------------------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self.settings.model_name

    def busy(self) -> bool:
        return any(d.engine.has_work() for d in self.drivers) or bool(self._inflight)

    @property
    def waiting_for_pd_peer(self) -> int:
        return len(self._admitting)

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_bos=bos)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def new_rid(self) -> str:
        return uuid.uuid4().hex

    def roll_error(self) -> bool:
        rate = self.faults.error_rate
        return rate > 0 and self._rng.random() < rate

    # ---- validation ------------------------------------------------------------------------------------

    def check_rank(self, rank: int | None) -> int | None:
        d = self.dp_size
        if rank is None:
            return None
        if d == 1 and rank == 0:
            return None
        if not 0 <= rank < d:
            raise RequestError(f"routed_dp_rank={rank} out of range [0, {d})")
        return rank

    def check_lengths(self, item: GenerationInput) -> None:
        n = len(item.input_ids)
        ctx = self.settings.context_length
        if n >= ctx:
            raise RequestError(
                f"The input ({n} tokens) is longer than the model's context length ({ctx} tokens)."
            )
        if item.max_new_tokens is not None and n + item.max_new_tokens > ctx:
            total = n + item.max_new_tokens
            raise RequestError(
                f"Requested token count exceeds the model's maximum context length of {ctx} tokens. "
                f"You requested a total of {total} tokens: {n} tokens from the input messages and "
                f"{item.max_new_tokens} tokens for the completion. Please reduce the number of tokens in "
                "the input messages or the completion to fit within the limit."
            )

    @staticmethod
    def check_sequence_count(total: int) -> None:
        """A simulator guard, not SGLang's: one request may not make the process build millions of them."""
        if total > MAX_SEQUENCES_PER_REQUEST:
            raise RequestError(
                f"The simulator serves at most {MAX_SEQUENCES_PER_REQUEST} sequences per request "
                f"(prompts x n), got {total}."
            )

    def check_items(self, items: list[GenerationInput]) -> None:
        """Every semantic check SGLang runs before a request reaches a scheduler."""
        seen: set[str] = set()
        vocab = self.tokenizer.vocab_size
        for item in items:
            if any(t >= vocab for t in item.input_ids):
                raise RequestError(
                    f"The input_ids {item.input_ids} contains values greater than the vocab size ({vocab})."
                )
            if item.rid in seen or item.rid in self._inflight or item.rid in self._admitting:
                raise RequestError(f"Duplicate request ID detected: {item.rid}")
            seen.add(item.rid)
            if not item.input_ids:
                raise RequestError("The input_ids should not be empty.")
            self.check_lengths(item)
            item.dp_rank = self.check_rank(item.dp_rank)
            if self.settings.disaggregation_mode != "null" and item.bootstrap is None:
                raise RequestError(
                    "Invalid request: Disaggregated request received without bootstrap room id. "
                    f"req.rid='{item.rid}'"
                )

    # ---- generation ------------------------------------------------------------------------------------

    @property
    def load_balance_method(self) -> str:
        """`auto` resolves as in SGLang: follow_bootstrap_room on a prefill server, round_robin otherwise."""
        method = self.settings.load_balance_method
        if method == "auto":
            return (
                "follow_bootstrap_room" if self.settings.disaggregation_mode == "prefill" else "round_robin"
            )
        return method

    def _pick_rank(self, item: GenerationInput) -> int:
        if item.dp_rank is not None:
            return item.dp_rank
        method = self.load_balance_method
        if method == "follow_bootstrap_room" and item.bootstrap is not None:
            return item.bootstrap.room % self.dp_size
        if method == "total_requests":
            return min(range(self.dp_size), key=lambda r: self.drivers[r].in_flight)
        if method == "total_tokens":
            loads = [d.engine.load() for d in self.drivers]
            return min(
                range(self.dp_size),
                key=lambda r: loads[r].num_used_tokens + loads[r].num_waiting_uncached_tokens,
            )
        return self.engine.pick_rank()

    async def generate(self, item: GenerationInput) -> AsyncGenerator[Progress, None]:
        """Run one sequence; yields once per delivered batch of tokens, the last one carries `finish`."""
        arrived = time.perf_counter()
        timing = Timing(received=time.time())
        rank = self._pick_rank(item)
        driver = self.drivers[rank]
        prefilled = await self._admit_cancellably(item)
        max_new = item.max_new_tokens
        if max_new is None:
            max_new = max(self.settings.context_length - len(item.input_ids), 1)
        request = SimRequest(
            rid=item.rid,
            input_ids=item.input_ids,
            max_new_tokens=max_new,
            ignore_eos=item.ignore_eos,
            stop_token_ids=item.stop_token_ids,
            prefilled=prefilled,
        )
        handle = driver.submit(request)
        tracking = _Tracking(driver=driver, handle=handle, arrived=arrived, timing=timing)
        self._inflight[item.rid] = tracking
        if item.log_metrics:
            self.metrics.request_started()
        finished = False
        try:
            async for progress in self._follow(item, tracking, prefilled):
                if progress.finish is not None:
                    finished = True
                    if item.log_metrics:
                        self._record_finish(progress, tracking)
                yield progress
                if progress.finish is not None:
                    return
        finally:
            self._inflight.pop(item.rid, None)
            if not finished:
                # The consumer went away (client disconnect, stream cut): free the rank, release the decode.
                driver.abort(item.rid)
                self._pd_publish(item, FinishReason(type="abort", message="prefill aborted"), [], 0, 0)
                if item.log_metrics:
                    self.metrics.request_aborted()

    async def _follow(
        self, item: GenerationInput, tracking: _Tracking, prefilled: PrefilledKV | None
    ) -> AsyncIterator[Progress]:
        handle = tracking.handle
        prompt_tokens = len(item.input_ids)
        cached_tokens = prefilled.cached_tokens if prefilled is not None else 0
        completion = 0
        text_so_far = ""
        stop_strs = item.stop_strs
        while True:
            events: list[Event] = await handle.next_events()
            if not events:  # server shutting down
                shutdown = FinishReason(type="abort", message="The server is shutting down.", status_code=503)
                yield Progress([], "", prompt_tokens, cached_tokens, completion, handle.dp_rank, shutdown)
                return
            new_ids: list[int] = []
            finish: FinishReason | None = None
            for event in events:
                if isinstance(event, TokensGenerated):
                    # PD decode: the engine emits the prefill's first token itself once the KV has "arrived".
                    new_ids.extend(event.token_ids)
                elif isinstance(event, RequestScheduled):
                    if tracking.timing.scheduled is None:
                        tracking.timing.scheduled = time.time()
                    if prefilled is None:
                        cached_tokens = event.cached_tokens
                    prompt_tokens = event.prompt_tokens or prompt_tokens
                elif isinstance(event, RequestFinished):
                    finish = event.finish
                    if event.prompt_tokens:
                        prompt_tokens = event.prompt_tokens
                    if prefilled is None and (event.cached_tokens or finish.type != "abort"):
                        cached_tokens = event.cached_tokens
            new_text = self.tokenizer.decode(new_ids) if new_ids else ""
            rollback = 0
            if stop_strs and new_text and (finish is None or finish.type != "abort"):
                combined = text_so_far + new_text
                hit = _find_stop(combined, stop_strs, len(text_so_far))
                if hit is not None:
                    pos, matched = hit
                    end = pos + (len(matched) if item.no_stop_trim else 0)
                    new_text = combined[len(text_so_far) : end] if end > len(text_so_far) else ""
                    rollback = max(len(text_so_far) - end, 0)
                    text_so_far = text_so_far[: len(text_so_far) - rollback]
                    tracking.driver.abort(item.rid)
                    finish = FinishReason(type="stop", matched=matched)
            if new_ids:
                now = time.perf_counter()
                if tracking.first_token_at is None:
                    tracking.first_token_at = now
                    tracking.timing.first_token = time.time()
                    if item.log_metrics:
                        self.metrics.observe_ttft(now - tracking.arrived)
                elif item.log_metrics and tracking.last_token_at is not None:
                    self.metrics.observe_itl((now - tracking.last_token_at) / len(new_ids))
                tracking.last_token_at = now
            completion += len(new_ids)
            text_so_far += new_text
            if not new_ids and finish is None:
                continue
            if finish is not None:
                tracking.timing.finished = time.time()
                # SGLang's prefill answers only once the KV has been handed over.
                self._pd_publish(item, finish, new_ids, prompt_tokens, cached_tokens)
            yield Progress(
                new_ids,
                new_text,
                prompt_tokens,
                cached_tokens,
                completion,
                handle.dp_rank,
                finish,
                rollback,
                tracking.timing,
            )
            if finish is not None:
                return

    def _record_finish(self, progress: Progress, tracking: _Tracking) -> None:
        e2e = time.perf_counter() - tracking.arrived
        self.metrics.request_finished(
            prompt_tokens=progress.prompt_tokens,
            completion_tokens=progress.completion_tokens,
            cached_tokens=progress.cached_tokens,
            e2e_s=e2e,
            aborted=progress.finish is not None and progress.finish.type == "abort",
        )

    def abort(self, rid: str, message: str | None = None) -> bool:
        tracking = self._inflight.pop(rid, None)
        if tracking is None:
            admitting = self._admitting.get(rid)
            if admitting is not None:
                admitting.set()  # still waiting for its PD peer: give up the wait
                return True
            return False
        return tracking.driver.abort(rid, message) if message is not None else tracking.driver.abort(rid)

    def abort_all(self) -> int:
        rids = list(self._inflight)
        for rid in rids:
            self.abort(rid)
        return len(rids)

    def flush_cache(self) -> bool:
        if self.busy():
            return False
        return all(d.engine.flush_cache() for d in self.drivers)

    # ---- PD ------------------------------------------------------------------------------------------

    async def _admit_cancellably(self, item: GenerationInput) -> PrefilledKV | None:
        """`_pd_admission`, abandoned early when the request is aborted (e.g. its client left)."""
        if self.settings.disaggregation_mode == "null":
            return None
        cancelled = asyncio.Event()
        self._admitting[item.rid] = cancelled
        admission = asyncio.ensure_future(self._pd_admission(item))
        watcher = asyncio.ensure_future(cancelled.wait())
        try:
            await asyncio.wait((admission, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            self._admitting.pop(item.rid, None)
        if not admission.done():
            admission.cancel()
            self._pd_publish(item, FinishReason(type="abort", message="prefill aborted"), [], 0, 0)
            raise RequestError("Abort before prefill", status=400)
        return admission.result()

    async def _pd_admission(self, item: GenerationInput) -> PrefilledKV | None:
        mode = self.settings.disaggregation_mode
        boot = item.bootstrap
        if mode == "null" or boot is None or boot.host == FAKE_BOOTSTRAP_HOST:
            if mode == "decode":
                return PrefilledKV(first_token_id=0, cached_tokens=0, kv_tokens=len(item.input_ids))
            return None
        if mode == "prefill":
            connected = await self.rooms.wait_decode(boot.room, self.settings.bootstrap_timeout_s)
            if not connected:
                t = self.settings.bootstrap_timeout_s
                raise RequestError(
                    f"Prefill bootstrap failed for request rank=0 req.rid='{item.rid}' "
                    f"req.bootstrap_room={boot.room} with exception "
                    f"KVTransferError(bootstrap_room={boot.room}): "
                    f"Request {boot.room} timed out after {t:.1f}s in KVPoll.Bootstrapping",
                    status=500,
                )
            return None
        assert self.kv_client is not None
        try:
            kv = await self.kv_client.fetch(boot.host, boot.port, boot.room, self.settings.waiting_timeout_s)
        except KVTransferError as exc:
            if exc.lost_connection:
                message = f"Lost connection with prefill instance (bootstrap_addr: {boot.host}:{boot.port})"
            elif exc.prefill_failed:
                message = (
                    f"Decode transfer failed for request rank=0 decode_req.req.rid='{item.rid}' "
                    f"decode_req.req.bootstrap_room={boot.room} with exception "
                    f"KVTransferError(bootstrap_room={boot.room}): Failed to get kvcache from prefill "
                    "instance, it might be dead"
                )
            else:
                t = self.settings.waiting_timeout_s
                message = (
                    f"Decode transfer failed for request rank=0 decode_req.req.rid='{item.rid}' "
                    f"decode_req.req.bootstrap_room={boot.room} with exception "
                    f"KVTransferError(bootstrap_room={boot.room}): Request {boot.room} timed out after "
                    f"{t:.1f}s in KVPoll.WaitingForInput"
                )
            raise RequestError(message, status=500) from exc
        return kv

    def _pd_publish(
        self, item: GenerationInput, finish: FinishReason, new_ids: list[int], prompt_tokens: int, cached: int
    ) -> None:
        boot = item.bootstrap
        if self.settings.disaggregation_mode != "prefill" or boot is None or boot.host == FAKE_BOOTSTRAP_HOST:
            return
        if finish.type == "abort" or not new_ids:
            self.rooms.fail(boot.room, finish.message or "prefill aborted")
            return
        self.rooms.publish(
            boot.room, PrefilledKV(first_token_id=new_ids[0], cached_tokens=cached, kv_tokens=prompt_tokens)
        )

    # ---- health ----------------------------------------------------------------------------------------

    def _on_output(self, dp_rank: int, events: list[Event]) -> None:
        waiters = self._output_waiters
        if waiters:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
            waiters.clear()

    async def probe(self, timeout_s: float) -> bool:
        """SGLang's health check: a 1-token generate of input_ids=[0] is sent, and the server counts as
        healthy as soon as any scheduler output arrives (for it or any other request) within the timeout."""
        if self.faults.hang:
            await asyncio.sleep(timeout_s)
            return False
        bootstrap = (
            Bootstrap(FAKE_BOOTSTRAP_HOST, 0, 0) if self.settings.disaggregation_mode != "null" else None
        )
        item = GenerationInput(
            rid=f"HEALTH_CHECK_{uuid.uuid4().hex}",
            input_ids=[0],
            max_new_tokens=1,
            bootstrap=bootstrap,
            log_metrics=False,
        )

        async def run() -> bool:
            async with contextlib.aclosing(self.generate(item)) as outputs:
                async for _ in outputs:
                    return True
            return False

        any_output: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._output_waiters.append(any_output)
        own = asyncio.ensure_future(run())
        try:
            await asyncio.wait((own, any_output), timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if own.done():
                return own.exception() is None and own.result()
            return any_output.done()
        finally:
            if any_output in self._output_waiters:
                self._output_waiters.remove(any_output)
            if not own.done():
                own.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await own


def _find_stop(text: str, stops: tuple[str, ...], searched_upto: int) -> tuple[int, str] | None:
    best: tuple[int, str] | None = None
    for stop in stops:
        if not stop:
            continue
        pos = text.find(stop, max(0, searched_upto - len(stop) + 1))
        if pos >= 0 and (best is None or pos < best[0]):
            best = (pos, stop)
    return best
