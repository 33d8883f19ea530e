"""A minimal, fast SGLang look-alike upstream for overhead benchmarks: it answers at once.

Raw asyncio + httptools (uvloop when available), so the upstream is never the bottleneck when
measuring what a proxy adds. POST /generate, /v1/completions and /v1/chat/completions answer with
pre-built bytes: ``"stream": true`` in the body gets ``--chunks`` SSE events (written one by one, each
its own chunked-encoding frame) and ``data: [DONE]``; otherwise one JSON object. It also serves
enough of SGLang's info surface (/health, /server_info, /get_server_info, /model_info,
/get_model_info, /v1/models, /get_load, /v1/loads) for sglang-router and vllm-router to accept it.

    python -m loadtests.trivial_upstream --port 0 [--chunks 16] [--dp-size 1]
prints ``TRIVIAL-UPSTREAM-READY <port>`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from typing import cast

import httptools
import msgspec

IDLE_TIMEOUT_S = 5.0  # SGLang's (uvicorn's) keep-alive
MODEL = "trivial"


class _StreamFlag(msgspec.Struct):
    stream: bool = False


_stream_decoder = msgspec.json.Decoder(_StreamFlag)


def _response(status: str, content_type: str, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
    return head.encode() + b"server: trivial\r\n\r\n" + body


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Replies(msgspec.Struct):
    """Every reply, pre-encoded, so serving costs only parsing and writes."""

    json: dict[str, bytes]
    stream_head: bytes
    stream_events: dict[str, list[bytes]]
    info: dict[str, bytes]
    not_found: bytes
    empty_ok: bytes


def build_replies(chunks: int, dp_size: int, port: int) -> Replies:
    enc = msgspec.json.encode
    meta = {
        "id": "0" * 32,
        "finish_reason": {"type": "length", "length": chunks},
        "prompt_tokens": 8,
        "completion_tokens": chunks,
        "cached_tokens": 0,
        "e2e_latency": 0.0,
    }
    usage = {"prompt_tokens": 8, "total_tokens": 8 + chunks, "completion_tokens": chunks}
    text = " tok" * chunks
    generate = enc({"text": text, "output_ids": list(range(chunks)), "meta_info": meta})
    completion = enc(
        {
            "id": "0" * 32,
            "object": "text_completion",
            "created": 0,
            "model": MODEL,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}],
            "usage": usage,
        }
    )
    chat = enc(
        {
            "id": "0" * 32,
            "object": "chat.completion",
            "created": 0,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": "length",
                }
            ],
            "usage": usage,
        }
    )

    def events(make: Callable[[int], object]) -> list[bytes]:
        out = [_chunk(b"data: " + enc(make(i)) + b"\n\n") for i in range(chunks)]
        return [*out, _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"]

    def gen_event(i: int) -> object:
        done = i == chunks - 1
        return {
            "text": " tok" * (i + 1),
            "output_ids": list(range(i + 1)),
            "meta_info": {
                **meta,
                "finish_reason": meta["finish_reason"] if done else None,
                "completion_tokens": i + 1,
            },
        }

    def chat_event(i: int) -> object:
        return {
            "id": "0" * 32,
            "object": "chat.completion.chunk",
            "created": 0,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": " tok"},
                    "logprobs": None,
                    "finish_reason": "length" if i == chunks - 1 else None,
                }
            ],
        }

    def completion_event(i: int) -> object:
        return {
            "id": "0" * 32,
            "object": "text_completion",
            "created": 0,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "text": " tok",
                    "logprobs": None,
                    "finish_reason": "length" if i == chunks - 1 else None,
                }
            ],
        }

    server_info = enc(
        {
            "model_path": MODEL,
            "served_model_name": MODEL,
            "tp_size": 1,
            "dp_size": dp_size,
            "load_balance_method": "round_robin",
            "disaggregation_mode": "null",
            "version": "0.5.6",
            "page_size": 1,
            "max_total_num_tokens": 100_000,
            "max_running_requests": 256,
            "max_total_tokens": 100_000,
            "max_prefill_tokens": 16384,
            "max_req_input_len": 100_000,
            "context_length": 163840,
            "enable_dp_attention": dp_size > 1,
            "status": "ready",
            "internal_states": [{"last_gen_throughput": 0.0} for _ in range(dp_size)],
            "disaggregation_bootstrap_port": 8998,
            "host": "127.0.0.1",
            "port": port,
        }
    )
    model_info = enc(
        {
            "model_path": MODEL,
            "tokenizer_path": MODEL,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": "deepseek_v3",
            "architectures": ["DeepseekV3ForCausalLM"],
        }
    )
    models = enc(
        {
            "object": "list",
            "data": [
                {
                    "id": MODEL,
                    "object": "model",
                    "created": 0,
                    "owned_by": "sglang",
                    "root": MODEL,
                    "parent": None,
                    "max_model_len": 163840,
                }
            ],
        }
    )
    get_load = enc(
        [{"dp_rank": r, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0} for r in range(dp_size)]
    )
    v1_loads = enc(
        {
            "timestamp": "1970-01-01T00:00:00Z",
            "version": "0.5.6",
            "loads": [
                {
                    "timestamp": 0.0,
                    "dp_rank": r,
                    "num_running_reqs": 0,
                    "num_waiting_reqs": 0,
                    "num_used_tokens": 0,
                    "max_total_num_tokens": 100_000,
                    "token_usage": 0.0,
                }
                for r in range(dp_size)
            ],
        }
    )
    ok_json = "200 OK"
    app_json = "application/json"
    return Replies(
        json={
            "/generate": _response(ok_json, app_json, generate),
            "/v1/completions": _response(ok_json, app_json, completion),
            "/v1/chat/completions": _response(ok_json, app_json, chat),
        },
        stream_head=(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\nserver: trivial\r\n\r\n"
        ),
        stream_events={
            "/generate": events(gen_event),
            "/v1/completions": events(completion_event),
            "/v1/chat/completions": events(chat_event),
        },
        info={
            "/health": _response(ok_json, app_json, b""),
            "/health_generate": _response(ok_json, app_json, b""),
            "/server_info": _response(ok_json, app_json, server_info),
            "/get_server_info": _response(ok_json, app_json, server_info),
            "/model_info": _response(ok_json, app_json, model_info),
            "/get_model_info": _response(ok_json, app_json, model_info),
            "/v1/models": _response(ok_json, app_json, models),
            "/get_load": _response(ok_json, app_json, get_load),
            "/v1/loads": _response(ok_json, app_json, v1_loads),
            "/flush_cache": _response(ok_json, "text/plain", b"Cache flushed.\n"),
        },
        not_found=_response("404 Not Found", app_json, b'{"detail":"Not Found"}'),
        empty_ok=_response(ok_json, app_json, b""),
    )


class _Connection(asyncio.Protocol):
    __slots__ = ("_body", "_idle", "_idle_timeout_s", "_loop", "_parser", "_path", "_replies", "_transport")

    def __init__(self, replies: Replies, idle_timeout_s: float) -> None:
        self._replies = replies
        self._idle_timeout_s = idle_timeout_s
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._path = b""
        self._body: list[bytes] = []
        self._loop = asyncio.get_running_loop()
        self._idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._transport = None

    def _arm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = self._loop.call_later(self._idle_timeout_s, self._close_idle)

    def _close_idle(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.write(_response("400 Bad Request", "text/plain", b"bad request"))
                self._transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._path = b""
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._path += url

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        transport = self._transport
        if transport is None:
            return
        path = self._path.split(b"?", 1)[0].decode("latin-1")
        method = self._parser.get_method()
        replies = self._replies
        if method in (b"POST", b"PUT") and path in replies.json:
            body = b"".join(self._body)
            stream = False
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                stream = _stream_decoder.decode(body).stream
            if stream:
                transport.write(replies.stream_head)
                for event in replies.stream_events[path]:
                    transport.write(event)
            else:
                transport.write(replies.json[path])
        elif path in replies.info:
            transport.write(replies.info[path])
        else:
            transport.write(replies.not_found)
        if not self._parser.should_keep_alive():
            transport.close()
        else:
            self._arm_idle()


async def serve(
    host: str, port: int, chunks: int, dp_size: int, idle_timeout_s: float = IDLE_TIMEOUT_S
) -> asyncio.Server:
    """Start serving; the caller owns the returned server (close() + wait_closed())."""
    loop = asyncio.get_running_loop()
    holder: list[Replies] = []
    server = await loop.create_server(
        lambda: _Connection(holder[0], idle_timeout_s), host, port, backlog=4096
    )
    bound = server.sockets[0].getsockname()[1]
    holder.append(build_replies(chunks, dp_size, bound))
    return server


async def _main(args: argparse.Namespace) -> None:
    server = await serve(args.host, args.port, args.chunks, args.dp_size, args.idle_timeout)
    print(f"TRIVIAL-UPSTREAM-READY {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    await server.wait_closed()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--chunks", type=int, default=16, help="SSE events per streamed response")
    parser.add_argument("--dp-size", type=int, default=1)
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=IDLE_TIMEOUT_S,
        help="seconds an idle keep-alive connection stays open (SGLang: 5)",
    )
    args = parser.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit("trivial upstream binds loopback only")
    try:
        import uvloop  # noqa: PLC0415

        uvloop.run(_main(args))
    except ImportError:
        asyncio.run(_main(args))


if __name__ == "__main__":
    main()
