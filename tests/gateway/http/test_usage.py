"""Token counts from the end of a response: only the final body or the last SSE event is decoded."""

from __future__ import annotations

from gateway.http._usage import Usage, usage_from_body, usage_from_stream_tail


def test_openai_body_with_cache_report() -> None:
    body = b'{"usage":{"prompt_tokens":12,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":8}}}'
    assert usage_from_body(body) == Usage(12, 8, 3)


def test_openai_body_without_cache_report() -> None:
    assert usage_from_body(b'{"usage":{"prompt_tokens":12,"prompt_tokens_details":null}}') == Usage(
        12, None, None
    )


def test_native_batch_sums_items() -> None:
    body = (
        b'[{"meta_info":{"prompt_tokens":3,"cached_tokens":1,"completion_tokens":2}},'
        b'{"meta_info":{"prompt_tokens":4,"cached_tokens":0,"completion_tokens":2}}]'
    )
    assert usage_from_body(body) == Usage(7, 1, 4)


def test_unparseable_or_unexpected_bodies_give_nothing() -> None:
    for body in (b"", b"not json", b'{"usage": "lots"}', b"[1, 2]", b'{"meta_info": {"prompt_tokens": "x"}}'):
        assert usage_from_body(body) == Usage()


def test_error_body_is_flagged() -> None:
    assert usage_from_body(b'{"error":{"message":"x"}}').error


def test_last_event_split_across_chunks() -> None:
    tail = [
        b'data: {"meta_info":{"prompt_tokens":1}}\n\ndata: {"meta_',
        b'info":{"prompt_tokens":5,"cached',
        b'_tokens":4}}\n\n',
        b"data: [DONE]\n\n",
    ]
    assert usage_from_stream_tail(tail) == Usage(5, 4, None)


def test_stream_without_done_and_with_data_inside_text() -> None:
    tail = [b'data: {"text":"x\\ndata: {\\"meta_info\\": 1}","meta_info":{"completion_tokens":9}}\n\n']
    assert usage_from_stream_tail(tail) == Usage(None, None, 9)


def test_stream_whose_last_event_start_was_not_kept() -> None:
    assert usage_from_stream_tail([b'okens":4}}\n\n', b"data: [DONE]\n\n"]) == Usage()


def test_stream_error_event_is_flagged() -> None:
    tail = [b'data: {"error":{"message":"boom"}}\n\ndata: [DONE]\n\n']
    assert usage_from_stream_tail(tail).error
