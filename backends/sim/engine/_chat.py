"""DeepSeek-V3's chat template (tokenizer_config.json ``chat_template``), rendered without Jinja.

Each turn only appends to the text of the turns before it, so the prompt of turn n+1 starts with the prompt
of turn n plus the assistant's answer and ``<｜end▁of▁sentence｜>``: multi-turn chats share token prefixes
exactly, which is what makes prefix-aware routing pay off.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from backends.sim.engine._tokenizer import ASSISTANT_TOKEN, BOS_TOKEN, EOS_TOKEN, USER_TOKEN

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


def _content_text(message: Mapping[str, Any], index: int) -> str:
    """A message's content as text; OpenAI content parts are joined with spaces, as SGLang does."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
                raise ValueError(f"messages[{index}].content: each part must be an object with a 'type'")
            if part["type"] == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise ValueError(f"messages[{index}].content: a text part needs a string 'text'")
                texts.append(text)
            else:
                raise ValueError(f"messages[{index}].content: part type {part['type']!r} is not supported")
        return " ".join(texts)
    raise ValueError(f"messages[{index}].content must be a string, a list of content parts, or null")


def _tool_call_text(call: Any, index: int) -> str:
    if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
        raise ValueError(f"messages[{index}].tool_calls: each call needs a 'function' object")
    function = call["function"]
    name = function.get("name")
    arguments = function.get("arguments", "")
    if not isinstance(name, str) or not isinstance(arguments, str):
        raise ValueError(f"messages[{index}].tool_calls: function name and arguments must be strings")
    kind = call.get("type", "function")
    return (
        "<｜tool▁call▁begin｜>" + str(kind) + "<｜tool▁sep｜>" + name + "\n```json\n" + arguments + "\n```"
        "<｜tool▁call▁end｜>"
    )


def render_chat(messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """The prompt text DeepSeek-V3's template makes of OpenAI-style ``messages``.

    Raises ValueError (naming the offending index) for messages that are not objects, lack a known
    role, or carry content of the wrong type; the server turns that into a 400.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{index}] must be an object")
        if message.get("role") not in _ROLES:
            raise ValueError(f"messages[{index}].role must be one of {sorted(_ROLES)}")

    system_parts = [
        _content_text(m, i) for i, m in enumerate(messages) if m["role"] in ("system", "developer")
    ]
    out: list[str] = [BOS_TOKEN, "\n\n".join(system_parts)]
    in_tool_outputs = False
    first_tool_output = True
    for index, message in enumerate(messages):
        role = message["role"]
        if role == "user":
            in_tool_outputs = False
            out.append(USER_TOKEN + _content_text(message, index))
        elif role == "assistant" and message.get("tool_calls"):
            in_tool_outputs = False
            calls = message["tool_calls"]
            if not isinstance(calls, list):
                raise ValueError(f"messages[{index}].tool_calls must be a list")
            content = message.get("content")
            out.append(ASSISTANT_TOKEN + (_content_text(message, index) if content is not None else ""))
            out.append("<｜tool▁calls▁begin｜>" + "\n".join(_tool_call_text(c, index) for c in calls))
            out.append("<｜tool▁calls▁end｜>" + EOS_TOKEN)
        elif role == "assistant":
            if in_tool_outputs:
                out.append("<｜tool▁outputs▁end｜>" + _content_text(message, index) + EOS_TOKEN)
                in_tool_outputs = False
            else:
                out.append(ASSISTANT_TOKEN + _content_text(message, index) + EOS_TOKEN)
        elif role == "tool":
            in_tool_outputs = True
            opener = "<｜tool▁outputs▁begin｜>" if first_tool_output else ""
            first_tool_output = False
            out.append(
                opener + "<｜tool▁output▁begin｜>" + _content_text(message, index) + "<｜tool▁output▁end｜>"
            )
    if in_tool_outputs:
        out.append("<｜tool▁outputs▁end｜>")
    elif add_generation_prompt:
        out.append(ASSISTANT_TOKEN)
    return "".join(out)
