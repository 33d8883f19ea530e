"""SGLang's native `/generate` (POST or PUT): single, batch and n>1; JSON or SSE."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from backends.sim.asgi import SSE_DONE, HttpRequest, encode_json, sse
from backends.sim.engine import FinishReason
from backends.sim.errors import (
    QUEUE_FULL,
    SchemaError,
    http_exception_body,
    native_error_body,
    schema_error,
    stream_error_payload,
    validation_body,
)
from backends.sim.logprobs import LogprobRequest, input_logprobs, output_logprobs
from backends.sim.params import parse_sampling
from backends.sim.runtime import Bootstrap, GenerationInput, Progress, RequestError, Runtime, Timing
from backends.sim.session import CutConnection, Exchange, merge_generations


def decode_json_object(body: bytes) -> dict[str, Any]:
    try:
        obj = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise SchemaError(
            [
                {
                    "type": "json_invalid",
                    "loc": ("body", 0),
                    "msg": "JSON decode error",
                    "input": {},
                    "ctx": {"error": str(exc)},
                }
            ]
        ) from exc
    if not isinstance(obj, dict):
        raise schema_error(
            (),
            "Input should be a valid dictionary or object to extract fields from",
            obj,
            "model_attributes_type",
        )
    return obj


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt_int(obj: dict[str, Any], key: str) -> int | None:
    v = obj.get(key)
    if v is None:
        return None
    if _is_int(v):
        return int(v)
    if isinstance(v, str):
        try:
            return int(v)
        except ValueError:
            pass
    raise schema_error((key,), "Input should be a valid integer", v, "int_type")


def _as_bool(obj: dict[str, Any], key: str, default: bool = False) -> bool:
    v = obj.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool):
        return v
    if v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        return v.lower() in ("true", "1", "yes", "on")
    raise schema_error((key,), "Input should be a valid boolean", v, "bool_type")


@dataclass(slots=True)
class GenerateRequest:
    """The schema-validated body (pydantic's view of GenerateReqInput)."""

    raw: dict[str, Any]
    stream: bool
    text: str | list[str] | None
    input_ids: list[int] | list[list[int]] | None
    sampling_params: dict[str, Any] | list[dict[str, Any]]
    rid: str | list[str] | None
    dp_rank: int | None
    bootstrap_host: Any
    bootstrap_port: Any
    bootstrap_room: Any


def parse_generate(obj: dict[str, Any], runtime: Runtime) -> GenerateRequest:
    text = obj.get("text")
    if text is not None and not (
        isinstance(text, str) or (isinstance(text, list) and all(isinstance(t, str) for t in text))
    ):
        raise schema_error(("text",), "Input should be a valid string", text, "string_type")
    ids = obj.get("input_ids")
    if ids is not None:
        flat = isinstance(ids, list) and all(_is_int(t) for t in ids)
        nested = isinstance(ids, list) and all(
            isinstance(r, list) and all(_is_int(t) for t in r) for r in ids
        )
        if not (flat or nested):
            raise schema_error(("input_ids",), "Input should be a valid list", ids, "list_type")
    sp = obj.get("sampling_params")
    if sp is None:
        sp = {}
    if not (isinstance(sp, dict) or (isinstance(sp, list) and all(isinstance(p, dict) for p in sp))):
        raise schema_error(("sampling_params",), "Input should be a valid dictionary", sp, "dict_type")
    rid = obj.get("rid")
    if rid is not None and not (
        isinstance(rid, str) or (isinstance(rid, list) and all(isinstance(r, str) for r in rid))
    ):
        raise schema_error(("rid",), "Input should be a valid string", rid, "string_type")
    stream = _as_bool(obj, "stream")
    version = runtime.version
    routed = _opt_int(obj, "routed_dp_rank") if version.generate_honours_routed_dp_rank else None
    legacy = _opt_int(obj, "data_parallel_rank") if version.generate_honours_data_parallel_rank else None
    dp_rank = routed if routed is not None else legacy
    return GenerateRequest(
        raw=obj,
        stream=stream,
        text=text,
        input_ids=ids,
        sampling_params=sp,
        rid=rid,
        dp_rank=dp_rank,
        bootstrap_host=obj.get("bootstrap_host"),
        bootstrap_port=obj.get("bootstrap_port"),
        bootstrap_room=obj.get("bootstrap_room"),
    )


def _pick(value: Any, i: int, batch: bool) -> Any:
    if batch and isinstance(value, list):
        return value[i] if i < len(value) else None
    return value


def build_items(req: GenerateRequest, runtime: Runtime) -> tuple[list[GenerationInput], bool]:
    """The semantic half of SGLang's normalisation; raises RequestError. Returns (items, is_batch_output)."""
    if (req.text is None) == (req.input_ids is None):
        raise RequestError("Either text, input_ids or input_embeds should be provided.")
    prompts: list[list[int]]
    if req.text is not None:
        batch = isinstance(req.text, list)
        texts = req.text if isinstance(req.text, list) else [req.text]
        prompts = [runtime.encode(t, bos=True) for t in texts]
    else:
        ids = req.input_ids
        assert ids is not None
        batch = bool(ids) and isinstance(ids[0], list)
        prompts = [list(r) for r in ids] if batch else [list(ids)]  # type: ignore[arg-type]
    if not prompts:
        raise RequestError("Either text, input_ids or input_embeds should be provided.")
    sp = req.sampling_params
    if isinstance(sp, list) and len(sp) != len(prompts) and len(sp) != 1:
        raise RequestError("The length of sampling_params should be equal to the batch size.")
    samplings = [
        parse_sampling(sp[min(i, len(sp) - 1)] if isinstance(sp, list) else sp, 128)
        for i in range(len(prompts))
    ]
    n = samplings[0].n
    if any(s.n != n for s in samplings):
        raise RequestError("The parallel_sample_num should be the same for all samples in sample params.")
    total = len(prompts) * n
    runtime.check_sequence_count(total)
    rids: list[str]
    if isinstance(req.rid, list):
        if len(req.rid) != total:
            raise RequestError("The specified rids length mismatch with the batch_size for batch processing.")
        rids = list(req.rid)
    elif isinstance(req.rid, str):
        rids = [req.rid] if total == 1 else [f"{req.rid}_{i}" for i in range(total)]
    else:
        rids = [runtime.new_rid() for _ in range(total)]
    items: list[GenerationInput] = []
    for i, prompt in enumerate(prompts):
        s = samplings[i]
        boot = _bootstrap(req, i, batch)
        for j in range(n):
            items.append(
                GenerationInput(
                    rid=rids[i * n + j],
                    input_ids=prompt,
                    max_new_tokens=s.max_new_tokens,
                    stop_strs=s.stop,
                    stop_token_ids=s.stop_token_ids,
                    ignore_eos=s.ignore_eos,
                    no_stop_trim=s.no_stop_trim,
                    dp_rank=req.dp_rank,
                    bootstrap=boot,
                )
            )
    runtime.check_items(items)
    return items, batch or n > 1


def _bootstrap(req: GenerateRequest, i: int, batch: bool) -> Bootstrap | None:
    room = _pick(req.bootstrap_room, i, batch)
    if room is None:
        return None
    host = _pick(req.bootstrap_host, i, batch)
    port = _pick(req.bootstrap_port, i, batch)
    if not _is_int(room) or room < 0:
        raise RequestError(f"Invalid bootstrap_room: {room!r}")
    if not isinstance(host, str) or not host:
        raise RequestError(f"Invalid bootstrap_host: {host!r}")
    if port is None:
        port = 8998
    if not _is_int(port) or not 0 < port < 65536:
        raise RequestError(f"Invalid bootstrap_port: {port!r}")
    return Bootstrap(host=host, port=int(port), room=int(room))


@dataclass(slots=True)
class _Output:
    """Accumulated output of one sequence, rendered into SGLang's dicts."""

    rid: str
    index: int
    started: float
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent_ids: int = 0
    sent_text: int = 0
    chunks: int = 0
    last: Progress | None = None
    input_ids: list[int] = field(default_factory=list)
    logprobs: LogprobRequest | None = None
    sent_logprobs: int = 0
    decode_steps: int = 0

    def add(self, p: Progress) -> None:
        if p.new_ids:
            self.decode_steps += 1
        self.ids.extend(p.new_ids)
        if p.rollback:
            self.text = self.text[: len(self.text) - p.rollback]
            self.sent_text = min(self.sent_text, len(self.text))
        self.text += p.new_text
        self.last = p


class GenerateHandler:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        s = runtime.settings
        self._incremental = s.incremental_streaming_output
        self._extended = runtime.version.extended_meta_info
        self._dp_reported = runtime.dp_size > 1
        self._structured_errors = runtime.version.structured_stream_errors
        self._speculative = runtime.settings.mtp
        self._metrics = runtime.settings.enable_metrics

    def meta_info(self, out: _Output, p: Progress, stamp: bool) -> dict[str, Any]:
        finish = p.finish.to_sglang() if p.finish is not None else None
        elapsed = time.perf_counter() - out.started
        if not self._extended:
            return {
                "id": out.rid,
                "finish_reason": finish,
                "prompt_tokens": p.prompt_tokens,
                "completion_tokens": p.completion_tokens,
                "cached_tokens": p.cached_tokens,
                "e2e_latency": elapsed,
            }
        meta: dict[str, Any] = {
            "id": out.rid,
            "finish_reason": finish,
            "prompt_tokens": p.prompt_tokens,
            "weight_version": "default",
            "num_retractions": 0,
        }
        if self._metrics and p.timing is not None:
            _add_timing(meta, p.timing, p.completion_tokens)
        if out.logprobs is not None:
            self._add_logprobs(meta, out)
        if self._speculative:
            meta["spec_verify_ct"] = max(out.decode_steps - 1, 0)
        meta.update(
            {
                "reasoning_tokens": 0,
                "completion_tokens": p.completion_tokens,
                "cached_tokens": p.cached_tokens,
                "cached_tokens_details": None,
                "dp_rank": p.dp_rank if self._dp_reported else None,
                "e2e_latency": elapsed,
            }
        )
        if stamp:
            meta["response_sent_to_client_ts"] = time.time()
        return meta

    def _add_logprobs(self, meta: dict[str, Any], out: _Output) -> None:
        req = out.logprobs
        assert req is not None
        tok = self.runtime.tokenizer
        first = out.sent_logprobs if self._incremental else 0
        if not self._incremental or out.chunks == 0:
            if self.runtime.settings.disaggregation_mode == "decode":
                # A PD decode never computes prompt logprobs: the router merges the prefill's.
                meta["input_token_logprobs"] = []
                if req.top_n > 0:
                    meta["input_top_logprobs"] = []
            else:
                meta.update(input_logprobs(tok, out.input_ids, req))
        else:
            meta["input_token_logprobs"] = []
            if req.top_n > 0:
                meta["input_top_logprobs"] = []
        meta.update(output_logprobs(tok, len(out.input_ids), out.ids, first, req))
        out.sent_logprobs = len(out.ids)

    async def __call__(self, req: HttpRequest) -> None:
        runtime = self.runtime
        try:
            parsed = parse_generate(decode_json_object(await req.body()), runtime)
        except SchemaError as exc:
            await req.respond(400, validation_body(exc))
            return
        async with Exchange(req, runtime) as exchange:
            if not await exchange.admit():
                return
            if parsed.stream:
                await self._stream(req, parsed, exchange)
            else:
                await self._unary(req, parsed, exchange)

    # ---- non-streaming ---------------------------------------------------------------------------------

    async def _unary(self, req: HttpRequest, parsed: GenerateRequest, exchange: Exchange) -> None:
        runtime = self.runtime
        try:
            items, as_list = build_items(parsed, runtime)
        except RequestError as exc:
            await req.respond(400, native_error_body(exc.message))
            return
        if runtime.roll_error():
            await req.respond(503, http_exception_body(QUEUE_FULL, 503))
            return
        exchange.track(items)
        started = time.perf_counter()
        outs = [
            _Output(item.rid, i, started, input_ids=item.input_ids, logprobs=spec)
            for i, (item, spec) in enumerate(zip(items, logprob_requests(parsed, items), strict=True))
        ]
        try:
            await asyncio.gather(*(self._collect(item, out) for item, out in zip(items, outs, strict=True)))
        except RequestError as exc:
            body = (
                native_error_body(exc.message)
                if exc.status == 400
                else http_exception_body(exc.message, exc.status)
            )
            await req.respond(exc.status, body)
            return
        for out in outs:
            finish = out.last.finish if out.last is not None else None
            if finish is not None and finish.type == "abort" and finish.status_code is not None:
                status = finish.status_code
                message = finish.message or "Abort"
                body = native_error_body(message) if status == 400 else http_exception_body(message, status)
                await req.respond(status, body)
                return
        results = [self._result(out) for out in outs]
        body = encode_json(results if as_list else results[0])
        await exchange.respond_unary(body)

    async def _collect(self, item: GenerationInput, out: _Output) -> None:
        async for p in self.runtime.generate(item):
            out.add(p)

    def _result(self, out: _Output) -> dict[str, Any]:
        p = out.last
        if p is None:  # pragma: no cover - generate() always ends with a finish
            p = Progress([], "", 0, 0, 0, 0, FinishReason(type="abort", message="no output"))
        return {"text": out.text, "output_ids": out.ids, "meta_info": self.meta_info(out, p, True)}

    # ---- streaming -------------------------------------------------------------------------------------

    async def _stream(self, req: HttpRequest, parsed: GenerateRequest, exchange: Exchange) -> None:
        runtime = self.runtime
        await req.start_stream()
        try:
            items, as_list = build_items(parsed, runtime)
        except RequestError as exc:
            await req.stream(sse(stream_error_payload(exc.message, self._structured_errors)))
            await req.end_stream(SSE_DONE)
            return
        exchange.track(items)
        started = time.perf_counter()
        outs = [
            _Output(item.rid, i, started, input_ids=item.input_ids, logprobs=spec)
            for i, (item, spec) in enumerate(zip(items, logprob_requests(parsed, items), strict=True))
        ]
        interval = parsed_interval(parsed, runtime.settings.stream_interval)
        try:
            if runtime.roll_error():
                for out in outs:
                    p = Progress(
                        [],
                        "",
                        len(items[out.index].input_ids),
                        0,
                        0,
                        0,
                        FinishReason(type="abort", message=QUEUE_FULL, status_code=503),
                    )
                    out.add(p)
                    await exchange.send_chunk(self._chunk(out, p, as_list, True))
            else:
                async for index, p in merge_generations(runtime, items):
                    out = outs[index]
                    out.add(p)
                    pending = len(out.ids) - out.sent_ids
                    if p.finish is None and pending < interval:
                        continue
                    await exchange.send_chunk(
                        self._chunk(out, p, as_list, out.chunks == 0 or p.finish is not None)
                    )
        except RequestError as exc:
            await req.stream(sse(stream_error_payload(exc.message, self._structured_errors)))
        except CutConnection:
            return
        await req.end_stream(SSE_DONE)

    def _chunk(self, out: _Output, p: Progress, as_list: bool, stamp: bool) -> bytes:
        if self._incremental:
            ids = out.ids[out.sent_ids :]
            text = out.text[out.sent_text :]
        else:
            ids = out.ids
            text = out.text
        out.sent_ids = len(out.ids)
        out.sent_text = len(out.text)
        out.chunks += 1
        chunk: dict[str, Any] = {"text": text, "output_ids": ids, "meta_info": self.meta_info(out, p, stamp)}
        if as_list:
            chunk["index"] = out.index
        return sse(encode_json(chunk))


def parsed_interval(parsed: GenerateRequest, default: int) -> int:
    sp = parsed.sampling_params
    params = sp[0] if isinstance(sp, list) and sp else sp
    value = params.get("stream_interval") if isinstance(params, dict) else None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def logprob_requests(parsed: GenerateRequest, items: list[GenerationInput]) -> list[LogprobRequest | None]:
    """Per sequence: what return_logprob / logprob_start_len / top_logprobs_num ask (scalar or per prompt)."""
    raw = parsed.raw
    per_prompt = max(len(items) // max(_prompt_count(parsed), 1), 1)
    out: list[LogprobRequest | None] = []
    for i in range(len(items)):
        p = i // per_prompt
        wanted = _nth(raw.get("return_logprob"), p)
        if wanted is not True:
            out.append(None)
            continue
        start = _nth(raw.get("logprob_start_len"), p)
        top = _nth(raw.get("top_logprobs_num"), p)
        out.append(
            LogprobRequest(
                start_len=start if _is_int(start) else -1,
                top_n=min(top, 20) if _is_int(top) and top > 0 else 0,
                with_text=raw.get("return_text_in_logprobs") is True,
            )
        )
    return out


def _prompt_count(parsed: GenerateRequest) -> int:
    if isinstance(parsed.text, list):
        return len(parsed.text)
    if parsed.input_ids and isinstance(parsed.input_ids[0], list):
        return len(parsed.input_ids)
    return 1


def _nth(value: Any, i: int) -> Any:
    if isinstance(value, list):
        return value[i] if i < len(value) else None
    return value


def _add_timing(meta: dict[str, Any], t: Timing, completion_tokens: int) -> None:
    """--enable-metrics' request timing (observability/req_time_stats.py), as far as it is known yet."""
    if t.scheduled is not None:
        meta["queue_time"] = t.scheduled - t.received
        meta["forward_entry_time"] = t.scheduled
    if t.first_token is not None:
        meta["prefill_finished_time"] = t.first_token
    meta["request_received_ts"] = t.received
    meta["api_server_dispatch_finish_ts"] = t.received
    if t.finished is not None:
        meta["request_finished_ts"] = t.finished
        if t.first_token is not None and t.finished > t.first_token and completion_tokens > 1:
            meta["decode_throughput"] = (completion_tokens - 1) / (t.finished - t.first_token)
