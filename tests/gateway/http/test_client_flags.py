"""The disconnect watcher and late-error answer shared by the proxy and PDProxy (gateway.http._asgi)."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from gateway.errors import internal_error
from gateway.http._asgi import fail_late, watch_disconnect


class _Flags:
    def __init__(self, *, started: bool = False, streaming: bool = False, completing: bool = False) -> None:
        self.started = started
        self.streaming = streaming
        self.completing = completing
        self.disconnected = False
        self.status = 0


async def _fail(flags: _Flags) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(dict(message))

    await fail_late(send, flags, internal_error(RuntimeError("x")))
    return sent


async def test_an_error_before_any_byte_is_an_error_response_with_its_status() -> None:
    flags = _Flags()
    sent = await _fail(flags)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 500
    assert msgspec.json.decode(sent[1]["body"])["error"]["code"] == "internal_error"
    assert flags.status == 500


async def test_an_error_mid_stream_ends_it_with_an_error_event_once() -> None:
    flags = _Flags(started=True, streaming=True)
    sent = await _fail(flags)
    assert len(sent) == 1 and not sent[0]["more_body"]
    assert sent[0]["body"].startswith(b"data: {") and sent[0]["body"].endswith(b"data: [DONE]\n\n")
    assert flags.completing and flags.status == 0
    assert await _fail(flags) == []  # already completing: nothing more


async def test_nothing_is_sent_to_a_client_that_left_or_got_a_whole_answer() -> None:
    gone = _Flags()
    gone.disconnected = True
    assert await _fail(gone) == []
    assert await _fail(_Flags(started=True, completing=True)) == []


async def test_a_disconnect_cancels_the_request_unless_its_answer_is_completing() -> None:
    for completing in (False, True):
        flags = _Flags(completing=completing)
        messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        handler = asyncio.get_running_loop().create_task(asyncio.sleep(10))
        watcher = asyncio.get_running_loop().create_task(watch_disconnect(messages.get, flags, handler))
        await messages.put({"type": "http.request", "body": b"", "more_body": False})
        await messages.put({"type": "http.disconnect"})
        await asyncio.wait_for(watcher, 1)
        await asyncio.sleep(0)
        assert flags.disconnected is not completing
        assert handler.cancelled() is not completing
        handler.cancel()
