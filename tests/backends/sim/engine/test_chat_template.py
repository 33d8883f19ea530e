"""DeepSeek-V3's chat template, and the token-prefix sharing across turns that prefix routing relies on."""

from __future__ import annotations

import re
from typing import Any

import pytest

from backends.sim.engine import (
    EngineConfig,
    RequestScheduled,
    ServerEngine,
    SimRequest,
    Tokenizer,
    TokensGenerated,
    render_chat,
)


def test_template_matches_deepseek_v3_layout() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    assert render_chat(messages) == (
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>Hello!<｜end▁of▁sentence｜>"
        "<｜User｜>Bye<｜Assistant｜>"
    )
    assert render_chat(messages, add_generation_prompt=False).endswith("<｜User｜>Bye")


def test_system_prompts_join_and_content_parts_flatten() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "A"},
        {"role": "system", "content": "B"},
        {"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]},
    ]
    assert render_chat(messages) == "<｜begin▁of▁sentence｜>A\n\nB<｜User｜>x y<｜Assistant｜>"


def test_tool_calls_and_outputs() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "get", "arguments": '{"c":"X"}'}}],
        },
        {"role": "tool", "content": "sunny"},
    ]
    text = render_chat(messages)
    assert "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get" in text
    assert text.endswith(
        "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
    )


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ([], "non-empty"),
        (["hi"], "messages[0] must be an object"),
        ([{"role": "wizard", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "not supported"),
    ],
)
def test_bad_messages_raise_clear_errors(messages: list[Any], fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        render_chat(messages)


def test_next_turn_prompt_extends_previous_prompt_and_generated_answer() -> None:
    tok = Tokenizer()
    engine = ServerEngine(EngineConfig(preset="h200-tp8"), tok)
    rank = engine.ranks[0]
    turn1 = [
        {"role": "system", "content": "You are a router expert."},
        {"role": "user", "content": "Explain caching."},
    ]
    ids1 = tok.encode(render_chat(turn1))
    rank.add(SimRequest("t1", ids1, 40))
    answer: list[int] = []
    while rank.has_work():
        for event in rank.step().events:
            if isinstance(event, TokensGenerated):
                answer.extend(event.token_ids)
    text = tok.decode(answer)
    turn2 = [*turn1, {"role": "assistant", "content": text}, {"role": "user", "content": "More."}]
    ids2 = tok.encode(render_chat(turn2))
    generated = [t for t in answer if t != tok.eos_token_id]
    # The previous prompt, then the answer's own token ids: a real server's radix cache hits all of it.
    assert ids2[: len(ids1) + len(generated)] == ids1 + generated
    rank.add(SimRequest("t2", ids2, 1))
    scheduled = [e for e in rank.step().events if isinstance(e, RequestScheduled) and e.rid == "t2"]
    assert scheduled and scheduled[0].cached_tokens >= len(ids1) + len(generated) - 1
