"""The engine's vocabulary: what a request is, what one scheduler iteration reports, how loaded a rank is."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

FinishType = Literal["length", "stop", "abort"]


class FinishReason(msgspec.Struct, frozen=True):
    """Why a request ended, in SGLang's terms (``meta_info.finish_reason``)."""

    type: FinishType
    length: int | None = None
    matched: int | str | None = None
    message: str | None = None
    # Set on aborts that SGLang turns into an HTTP status (e.g. 503 when a queue is full).
    status_code: int | None = None

    def to_sglang(self) -> dict[str, Any]:
        """The exact dict SGLang puts in ``meta_info.finish_reason``."""
        if self.type == "length":
            return {"type": "length", "length": self.length}
        if self.type == "stop":
            return {"type": "stop", "matched": self.matched}
        return {"type": "abort", "message": self.message, "status_code": self.status_code, "err_type": None}


class PrefilledKV(msgspec.Struct, frozen=True):
    """What a PD decode server receives from the prefill side: the first token and the prompt's KV."""

    first_token_id: int
    # cached_tokens as the prefill server reported it; the decode server echoes it.
    cached_tokens: int
    # How many tokens of KV are transferred (normally the prompt length).
    kv_tokens: int


class SimRequest(msgspec.Struct, frozen=True):
    rid: str
    input_ids: list[int]
    max_new_tokens: int
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    prefilled: PrefilledKV | None = None
    # Stop strings, matched against the decoded output (finish "stop" with ``matched`` = the string).
    stop_strings: tuple[str, ...] = ()


class RequestScheduled(msgspec.Struct, frozen=True):
    """The request left the waiting queue and its first prefill chunk ran in this step."""

    rid: str
    cached_tokens: int
    prompt_tokens: int


class TokensGenerated(msgspec.Struct, frozen=True):
    """New output tokens of one request (one per decode step; up to 1 + draft tokens with MTP)."""

    rid: str
    token_ids: list[int]


class RequestFinished(msgspec.Struct, frozen=True):
    rid: str
    finish: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


Event = RequestScheduled | TokensGenerated | RequestFinished


class StepResult(msgspec.Struct, frozen=True):
    """One scheduler iteration: wait ``duration_s`` (real or virtual), then deliver ``events`` in order."""

    duration_s: float
    events: list[Event]


class RankLoad(msgspec.Struct, frozen=True):
    """One DP rank's load as SGLang reports it in ``/v1/loads``."""

    num_running_reqs: int
    num_waiting_reqs: int
    num_waiting_uncached_tokens: int
    num_used_tokens: int
    max_total_num_tokens: int
    token_usage: float
    cache_hit_rate: float
    gen_throughput: float
