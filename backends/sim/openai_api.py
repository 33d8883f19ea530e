"""SGLang's OpenAI-compatible `/v1/chat/completions` and `/v1/completions`, chunk for chunk."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, NamedTuple

from backends.sim.asgi import SSE_DONE, HttpRequest, encode_json, sse
from backends.sim.engine import FinishReason, render_chat
from backends.sim.errors import (
    QUEUE_FULL,
    SchemaError,
    http_exception_body,
    openai_error_body,
    openai_stream_error_payload,
    schema_error,
    validation_body,
)
from backends.sim.logprobs import chat_logprobs, completion_logprobs
from backends.sim.native import _as_bool, _is_int, _opt_int, decode_json_object
from backends.sim.params import Sampling, parse_sampling
from backends.sim.runtime import Bootstrap, GenerationInput, Progress, RequestError, Runtime
from backends.sim.session import CutConnection, Exchange, merge_generations

_MESSAGE_ROLES = frozenset(
    {"system", "assistant", "tool", "function", "developer", "latest_reminder", "user"}
)
_SAMPLING_KEYS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "no_stop_trim",
    "regex",
    "ebnf",
    "json_schema",
    "n",
)


@dataclass(slots=True)
class OpenAIRequest:
    chat: bool
    model: str
    stream: bool
    include_usage: bool
    continuous_usage: bool
    sampling_params: dict[str, Any]
    prompts: list[list[int]]
    prompt_texts: list[str]
    rid: str | list[str] | None
    dp_rank: int | None
    bootstrap: Bootstrap | None
    echo: bool
    semantic_error: RequestError | None
    logprobs_top: int | None = None  # None: no logprobs; else how many alternatives per token


def _opt_number(obj: dict[str, Any], key: str) -> float | None:
    v = obj.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise schema_error((key,), "Input should be a valid number", v, "float_type")
    return float(v)


def _opt_str(obj: dict[str, Any], key: str) -> str | None:
    v = obj.get(key)
    if v is None or isinstance(v, str):
        return v
    raise schema_error((key,), "Input should be a valid string", v, "string_type")


def _normalise_message(i: int, message: Any) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise schema_error(
            ("messages", i), "Input should be a valid dictionary or object", message, "dict_type"
        )
    role = message.get("role")
    if not isinstance(role, str) or role.lower() not in _MESSAGE_ROLES:
        raise schema_error(
            ("messages", i, "role"),
            "Input should be 'user' or one of the generic roles",
            role,
            "literal_error",
        )
    content = message.get("content")
    if role.lower() == "user" and content is None:
        raise schema_error(("messages", i, "content"), "Field required", message, "missing")
    if content is not None and not isinstance(content, str | list):
        raise schema_error(
            ("messages", i, "content"), "Input should be a valid string", content, "string_type"
        )
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise schema_error(
                    ("messages", i, "content"),
                    "Input should be a valid content part",
                    part,
                    "union_tag_invalid",
                )
            if part["type"] == "text":
                if not isinstance(part.get("text"), str):
                    raise schema_error(("messages", i, "content", "text"), "Field required", part, "missing")
                texts.append(part["text"])
        content = "".join(texts)
    return {**message, "role": role.lower(), "content": content}


def parse_openai(obj: dict[str, Any], runtime: Runtime, chat: bool, headers: dict[str, str]) -> OpenAIRequest:
    """Schema checks raise SchemaError (plain 400); semantic ones are kept for after admission."""
    model = _opt_str(obj, "model") or "default"
    stream = _as_bool(obj, "stream")
    options = obj.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise schema_error(("stream_options",), "Input should be a valid dictionary", options, "dict_type")
    options = options or {}
    include_usage = (
        bool(options.get("include_usage")) or runtime.settings.stream_response_default_include_usage
    )
    continuous = bool(options.get("continuous_usage_stats"))
    for key in (
        "temperature",
        "top_p",
        "min_p",
        "frequency_penalty",
        "presence_penalty",
        "repetition_penalty",
    ):
        _opt_number(obj, key)
    n = _opt_int(obj, "n")
    sampling: dict[str, Any] = {k: obj[k] for k in _SAMPLING_KEYS if obj.get(k) is not None}
    if n is not None:
        sampling["n"] = n
    if obj.get("min_tokens") is not None:
        sampling["min_new_tokens"] = _opt_int(obj, "min_tokens")
    prompts: list[list[int]] = []
    texts: list[str] = []
    semantic: RequestError | None = None
    echo = False
    if chat:
        messages = obj.get("messages")
        if messages is None:
            raise schema_error(("messages",), "Field required", obj, "missing")
        if not isinstance(messages, list):
            raise schema_error(("messages",), "Input should be a valid list", messages, "list_type")
        normalised = [_normalise_message(i, m) for i, m in enumerate(messages)]
        max_tokens = _opt_int(obj, "max_completion_tokens")
        if max_tokens is None:
            max_tokens = _opt_int(obj, "max_tokens")
        sampling["max_new_tokens"] = max_tokens
        ids = obj.get("input_ids")
        if ids is not None and not (isinstance(ids, list) and all(_is_int(t) for t in ids)):
            raise schema_error(("input_ids",), "Input should be a valid list", ids, "list_type")
        if not normalised:
            semantic = RequestError("Messages cannot be empty.")
        elif ids:
            prompts = [list(ids)]
            texts = [runtime.decode(list(ids))]
        else:
            try:
                text = render_chat(normalised, add_generation_prompt=True)
            except ValueError as exc:
                raise schema_error(("messages",), str(exc), messages) from exc
            prompts = [runtime.encode(text)]
            texts = [text]
    else:
        prompt = obj.get("prompt")
        if prompt is None:
            raise schema_error(("prompt",), "Field required", obj, "missing")
        if isinstance(prompt, str):
            texts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            texts = list(prompt)
        elif isinstance(prompt, list) and all(_is_int(t) for t in prompt):
            prompts = [list(prompt)]
        elif isinstance(prompt, list) and all(
            isinstance(r, list) and all(_is_int(t) for t in r) for r in prompt
        ):
            prompts = [list(r) for r in prompt]
        else:
            raise schema_error(("prompt",), "Input should be a valid string", prompt, "string_type")
        if texts:
            prompts = [runtime.encode(t, bos=True) for t in texts]
        else:
            texts = [runtime.decode(p) for p in prompts]
        max_tokens = _opt_int(obj, "max_tokens")
        if max_tokens is None and "max_tokens" not in obj:
            max_tokens = 16
        if max_tokens is not None and max_tokens <= 0:
            raise SchemaError(
                [
                    {
                        "type": "value_error",
                        "loc": ("body", "max_tokens"),
                        "msg": "Value error, max_tokens must be positive",
                        "input": max_tokens,
                        "ctx": {"error": "max_tokens must be positive"},
                    }
                ]
            )
        sampling["max_new_tokens"] = max_tokens
        echo = _as_bool(obj, "echo")
        if not prompts or any(not p for p in prompts):
            semantic = semantic or RequestError("Prompt cannot be empty.")
    logprobs_top: int | None = None
    if chat:
        if _as_bool(obj, "logprobs"):
            logprobs_top = min(max(_opt_int(obj, "top_logprobs") or 0, 0), 20)
    else:
        wanted = _opt_int(obj, "logprobs")
        if wanted is not None:
            logprobs_top = min(max(wanted, 0), 20)
    rid = obj.get("rid")
    if rid is not None and not (
        isinstance(rid, str) or (isinstance(rid, list) and all(isinstance(r, str) for r in rid))
    ):
        raise schema_error(("rid",), "Input should be a valid string", rid, "string_type")
    dp_rank: int | None = None
    if runtime.version.openai_honours_routed_dp_rank:
        dp_rank = _opt_int(obj, "routed_dp_rank")
    legacy = _opt_int(obj, "data_parallel_rank")
    if dp_rank is None:
        dp_rank = legacy
    header = headers.get("x-data-parallel-rank")
    if header is not None:
        try:
            dp_rank = int(header.strip())
        except ValueError:
            semantic = semantic or RequestError(
                f"Invalid X-Data-Parallel-Rank header: must be an integer, got '{header}'"
            )
    bootstrap = None
    room = obj.get("bootstrap_room")
    if room is not None:
        host = obj.get("bootstrap_host")
        port = obj.get("bootstrap_port") or 8998
        if _is_int(room) and room >= 0 and isinstance(host, str) and _is_int(port) and 0 < port < 65536:
            bootstrap = Bootstrap(host, int(port), int(room))
        else:
            semantic = semantic or RequestError(f"Invalid bootstrap info: {host!r}:{port!r} room {room!r}")
    return OpenAIRequest(
        chat=chat,
        model=model,
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous,
        sampling_params=sampling,
        prompts=prompts,
        prompt_texts=texts,
        rid=rid,
        dp_rank=dp_rank,
        bootstrap=bootstrap,
        echo=echo,
        semantic_error=semantic,
        logprobs_top=logprobs_top,
    )


def build_items(parsed: OpenAIRequest, runtime: Runtime) -> tuple[list[GenerationInput], Sampling]:
    if parsed.semantic_error is not None:
        raise parsed.semantic_error
    sampling = parse_sampling(parsed.sampling_params, parsed.sampling_params.get("max_new_tokens"))
    n = sampling.n
    total = len(parsed.prompts) * n
    runtime.check_sequence_count(total)
    if isinstance(parsed.rid, list):
        if len(parsed.rid) != total:
            raise RequestError("The specified rids length mismatch with the batch_size for batch processing.")
        rids = list(parsed.rid)
    elif isinstance(parsed.rid, str):
        rids = [parsed.rid] if total == 1 else [f"{parsed.rid}_{i}" for i in range(total)]
    else:
        rids = [runtime.new_rid() for _ in range(total)]
    items = [
        GenerationInput(
            rid=rids[i * n + j],
            input_ids=prompt,
            max_new_tokens=sampling.max_new_tokens,
            stop_strs=sampling.stop,
            stop_token_ids=sampling.stop_token_ids,
            ignore_eos=sampling.ignore_eos,
            no_stop_trim=sampling.no_stop_trim,
            dp_rank=parsed.dp_rank,
            bootstrap=parsed.bootstrap,
        )
        for i, prompt in enumerate(parsed.prompts)
        for j in range(n)
    ]
    runtime.check_items(items)
    return items, sampling


def _finish_reason(finish: FinishReason | None) -> tuple[str | None, int | str | None]:
    if finish is None:
        return None, None
    if finish.type == "stop":
        return "stop", finish.matched
    return finish.type, None


class OpenAIHandler:
    def __init__(self, runtime: Runtime, chat: bool) -> None:
        self.runtime = runtime
        self.chat = chat
        self._object = "chat.completion" if chat else "text_completion"
        self._chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self._cache_report = runtime.settings.enable_cache_report

    def _usage(self, outs: list[_Seq], n: int, exclude_none: bool = False) -> dict[str, Any]:
        prompt = sum(o.prompt_tokens for o in outs[::n])
        completion = sum(o.completion_tokens for o in outs)
        cached = sum(o.cached_tokens for o in outs[::n])
        details = {"cached_tokens": cached} if self._cache_report and cached > 0 else None
        usage: dict[str, Any] = {
            "prompt_tokens": prompt,
            "total_tokens": prompt + completion,
            "completion_tokens": completion,
            "prompt_tokens_details": details,
            "reasoning_tokens": 0,
        }
        if exclude_none and details is None:
            del usage["prompt_tokens_details"]
        return usage

    async def __call__(self, req: HttpRequest) -> None:
        runtime = self.runtime
        content_type = req.headers.get("content-type", "")
        try:
            if content_type.split(";")[0].strip().lower() != "application/json":
                raise SchemaError(
                    [
                        {
                            "type": "value_error",
                            "loc": ("header", "content-type"),
                            "msg": "Unsupported Media Type: Only 'application/json' is allowed",
                            "input": content_type,
                        }
                    ]
                )
            parsed = parse_openai(decode_json_object(await req.body()), runtime, self.chat, req.headers)
        except SchemaError as exc:
            await req.respond(400, validation_body(exc))
            return
        async with Exchange(req, runtime) as exchange:
            if not await exchange.admit():
                return
            try:
                items, sampling = build_items(parsed, runtime)
            except RequestError as exc:
                err_type = "BadRequestError" if parsed.semantic_error is exc else "BadRequest"
                await req.respond(400, openai_error_body(exc.message, err_type, 400))
                return
            if runtime.roll_error():
                await req.respond(503, http_exception_body(QUEUE_FULL, 503))
                return
            exchange.track(items)
            seqs = [
                _Seq(item.rid, parsed.prompt_texts[i // sampling.n] if parsed.echo else "")
                for i, item in enumerate(items)
            ]
            try:
                if parsed.stream:
                    await self._stream(parsed, items, seqs, sampling.n, exchange)
                else:
                    await self._unary(parsed, items, seqs, sampling.n, exchange)
            except CutConnection:
                return

    def _logprobs(self, parsed: OpenAIRequest, seq: _Seq) -> dict[str, Any] | None:
        """Logprobs of the tokens not reported yet (all of them for a non-streamed reply)."""
        top = parsed.logprobs_top
        if top is None:
            return None
        ids = seq.ids[seq.logprobs_sent :]
        start = seq.prompt_tokens + seq.logprobs_sent
        offset = len(seq.prefix) + len(self.runtime.decode(seq.ids[: seq.logprobs_sent]))
        seq.logprobs_sent = len(seq.ids)
        tok = self.runtime.tokenizer
        if self.chat:
            return chat_logprobs(tok, ids, start, top)
        return completion_logprobs(tok, ids, start, top, offset)

    async def _fail(self, req: HttpRequest, exc: RequestError) -> None:
        if exc.status == 400:
            await req.respond(400, openai_error_body(exc.message, "BadRequest", 400))
        else:
            await req.respond(exc.status, http_exception_body(exc.message, exc.status))

    async def _unary(
        self,
        parsed: OpenAIRequest,
        items: list[GenerationInput],
        seqs: list[_Seq],
        n: int,
        exchange: Exchange,
    ) -> None:
        req = exchange.request
        try:
            async for index, p in merge_generations(self.runtime, items):
                seqs[index].add(p)
        except RequestError as exc:
            await self._fail(req, exc)
            return
        for seq in seqs:
            f = seq.finish
            if f is not None and f.type == "abort" and f.status_code is not None:
                await self._fail(req, RequestError(f.message or "Abort", f.status_code))
                return
        choices: list[dict[str, Any]] = []
        for i, seq in enumerate(seqs):
            reason, matched = _finish_reason(seq.finish)
            if self.chat:
                message = {
                    "role": "assistant",
                    "content": seq.text,
                    "reasoning_content": None,
                    "tool_calls": None,
                }
                choices.append(
                    {
                        "index": i,
                        "message": message,
                        "logprobs": self._logprobs(parsed, seq),
                        "finish_reason": reason,
                        "matched_stop": matched,
                    }
                )
            else:
                choices.append(
                    {
                        "index": i,
                        "text": seq.prefix + seq.text,
                        "logprobs": self._logprobs(parsed, seq),
                        "finish_reason": reason,
                        "matched_stop": matched,
                    }
                )
        body = {
            "id": seqs[0].rid,
            "object": self._object,
            "created": int(time.time()),
            "model": parsed.model,
            "choices": choices,
            "usage": self._usage(seqs, n),
            "metadata": {"weight_version": "default"},
        }
        await exchange.respond_unary(encode_json(body))

    async def _stream(
        self,
        parsed: OpenAIRequest,
        items: list[GenerationInput],
        seqs: list[_Seq],
        n: int,
        exchange: Exchange,
    ) -> None:
        req = exchange.request
        events = merge_generations(self.runtime, items)
        # SGLang "kick-starts" streams: the first output is awaited before the 200, so early errors are JSON.
        try:
            first = await anext(events)
        except RequestError as exc:
            await self._fail(req, exc)
            return
        except StopAsyncIteration:  # pragma: no cover - generate() always yields a finish
            await self._fail(req, RequestError("no output", 500))
            return
        f = first[1].finish
        if f is not None and f.type == "abort" and f.status_code is not None:
            await self._fail(req, RequestError(f.message or "Abort", f.status_code))
            return
        await req.start_stream()
        created = int(time.time())
        head = {"object": self._chunk_object, "created": created, "model": parsed.model}
        state = _StreamState(exchange, parsed, seqs, n, head)
        try:
            await self._emit(state, *first)
            async for index, p in events:
                await self._emit(state, index, p)
        except RequestError as exc:
            await req.stream(sse(openai_stream_error_payload(exc.message, exc.status)))
            await req.end_stream(SSE_DONE)
            return
        if parsed.include_usage:
            usage_chunk = {
                "id": seqs[0].rid,
                **head,
                "choices": [],
                "usage": self._usage(seqs, n, exclude_none=not self.chat),
            }
            await exchange.send_chunk(sse(encode_json(usage_chunk)))
        await req.end_stream(SSE_DONE)

    async def _emit(self, stream: _StreamState, index: int, p: Progress) -> None:
        exchange, parsed, seqs, n, head = stream
        seq = seqs[index]
        seq.add(p)
        f = p.finish
        if f is not None and f.type == "abort" and f.status_code is not None:
            raise RequestError(f.message or "Abort", f.status_code)
        reason, matched = _finish_reason(f)
        usage = self._usage(seqs, n) if parsed.continuous_usage else None
        if self.chat:
            if not seq.role_sent:
                seq.role_sent = True
                delta = {"reasoning_content": None, "role": "assistant", "content": ""}
                await self._send(exchange, seq, head, index, delta)
            if p.new_text:
                delta = {"reasoning_content": None, "content": p.new_text}
                logprobs = self._logprobs(parsed, seq)
                await self._send(exchange, seq, head, index, delta, usage=usage, logprobs=logprobs)
            if f is not None:
                delta = {"reasoning_content": None}
                await self._send(
                    exchange, seq, head, index, delta, reason=reason, matched=matched, usage=usage
                )
            return
        text = p.new_text
        if not seq.prefix_sent:
            seq.prefix_sent = True
            text = seq.prefix + text
        if not text and f is None:
            return
        choice = {
            "index": index,
            "text": text,
            "logprobs": self._logprobs(parsed, seq),
            "finish_reason": reason,
            "matched_stop": matched,
        }
        chunk = {"id": seq.rid, **head, "choices": [choice], "usage": usage}
        await exchange.send_chunk(sse(encode_json(chunk)))

    async def _send(
        self,
        exchange: Exchange,
        seq: _Seq,
        head: dict[str, Any],
        index: int,
        delta: dict[str, Any],
        *,
        reason: str | None = None,
        matched: int | str | None = None,
        usage: dict[str, Any] | None = None,
        logprobs: dict[str, Any] | None = None,
    ) -> None:
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": reason,
            "matched_stop": matched,
        }
        chunk: dict[str, Any] = {"id": seq.rid, **head, "choices": [choice]}
        if usage is not None:
            chunk["usage"] = usage
        await exchange.send_chunk(sse(encode_json(chunk)))


class _StreamState(NamedTuple):
    exchange: Exchange
    parsed: OpenAIRequest
    seqs: list[_Seq]
    n: int
    head: dict[str, Any]


class _Seq:
    __slots__ = (
        "cached_tokens",
        "completion_tokens",
        "finish",
        "ids",
        "logprobs_sent",
        "prefix",
        "prefix_sent",
        "prompt_tokens",
        "rid",
        "role_sent",
        "text",
    )

    def __init__(self, rid: str, prefix: str) -> None:
        self.rid = rid
        self.prefix = prefix
        self.text = ""
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.finish: FinishReason | None = None
        self.role_sent = False
        self.prefix_sent = False
        self.ids: list[int] = []
        self.logprobs_sent = 0

    def add(self, p: Progress) -> None:
        self.ids.extend(p.new_ids)
        if p.rollback:
            self.text = self.text[: len(self.text) - p.rollback]
        self.text += p.new_text
        self.prompt_tokens = p.prompt_tokens
        self.cached_tokens = p.cached_tokens
        self.completion_tokens = p.completion_tokens
        if p.finish is not None:
            self.finish = p.finish
