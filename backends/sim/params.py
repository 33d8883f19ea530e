"""SGLang's SamplingParams checks (same messages), shared by /generate and the OpenAI endpoints."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from backends.sim.runtime import RequestError


@dataclass(frozen=True, slots=True)
class Sampling:
    max_new_tokens: int | None
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool
    no_stop_trim: bool
    n: int
    stream_interval: int | None


def _number(params: dict[str, Any], key: str, default: float) -> float:
    value = params.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(f"{key} must be a number, got {value!r}.")
    return float(value)


def _integer(params: dict[str, Any], key: str, default: int | None) -> int | None:
    value = params.get(key)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{key} must be an integer, got {value!r}.")
    return value


def _flag(params: dict[str, Any], key: str) -> bool:
    value = params.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"{key} must be a boolean, got {value!r}.")
    return value


def parse_sampling(params: dict[str, Any], default_max_new_tokens: int | None) -> Sampling:
    """Validate like `SamplingParams.__post_init__` + `verify()`; raises RequestError (a 400)."""
    temperature = _number(params, "temperature", 1.0)
    top_p = _number(params, "top_p", 1.0)
    min_p = _number(params, "min_p", 0.0)
    top_k = _integer(params, "top_k", -1)
    frequency_penalty = _number(params, "frequency_penalty", 0.0)
    presence_penalty = _number(params, "presence_penalty", 0.0)
    repetition_penalty = _number(params, "repetition_penalty", 1.0)
    min_new_tokens = _integer(params, "min_new_tokens", 0) or 0
    max_new_tokens = _integer(params, "max_new_tokens", default_max_new_tokens)
    n = _integer(params, "n", 1) or 1
    if 0 <= temperature < 1e-6:
        temperature, top_k = 1.0, 1  # greedy
    if not math.isfinite(temperature) or temperature < 0.0:
        raise RequestError(f"temperature must be a non-negative finite number, got {temperature}.")
    if not 0.0 < top_p <= 1.0:
        raise RequestError(f"top_p must be in (0, 1], got {top_p}.")
    if not 0.0 <= min_p <= 1.0:
        raise RequestError(f"min_p must be in [0, 1], got {min_p}.")
    if top_k is not None and top_k != -1 and top_k < 1:
        raise RequestError(f"top_k must be -1 (disable) or at least 1, got {top_k}.")
    if not -2.0 <= frequency_penalty <= 2.0:
        raise RequestError(f"frequency_penalty must be in [-2, 2], got {frequency_penalty}.")
    if not -2.0 <= presence_penalty <= 2.0:
        raise RequestError(f"presence_penalty must be in [-2, 2], got {presence_penalty}.")
    if not 0.0 < repetition_penalty <= 2.0:
        raise RequestError(
            f"repetition_penalty must be in (0, 2] (1.0 = no penalty), got {repetition_penalty}."
        )
    if min_new_tokens < 0:
        raise RequestError(f"min_new_tokens must be in [0, max_new_tokens], got {min_new_tokens}.")
    if max_new_tokens is not None:
        if max_new_tokens < 0:
            raise RequestError(f"max_new_tokens must be at least 0, got {max_new_tokens}.")
        if min_new_tokens > max_new_tokens:
            raise RequestError(
                f"min_new_tokens must be in [0, max_new_tokens({max_new_tokens})], got {min_new_tokens}."
            )
    if sum(params.get(k) is not None for k in ("json_schema", "regex", "ebnf")) > 1:
        raise RequestError("Only one of regex, json_schema, or ebnf can be set.")
    if n < 1:
        raise RequestError(f"n must be at least 1, got {n}.")
    return Sampling(
        max_new_tokens=max_new_tokens,
        stop=_stop_strings(params.get("stop")),
        stop_token_ids=_stop_ids(params.get("stop_token_ids")),
        ignore_eos=_flag(params, "ignore_eos"),
        no_stop_trim=_flag(params, "no_stop_trim"),
        n=n,
        stream_interval=_integer(params, "stream_interval", None),
    )


def _stop_strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(v for v in value if v)
    raise RequestError(f"stop must be a string or a list of strings, got {value!r}.")


def _stop_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    raise RequestError(f"stop_token_ids must be a list of integers, got {value!r}.")
