"""Decoders for SGLang's info and load endpoints: msgspec Structs holding only the fields used.

Every field is optional with a default, so a server of any age (or the simulator) decodes; unknown
fields are skipped by msgspec without being materialised.
"""

from __future__ import annotations

import msgspec


class ServerInfo(msgspec.Struct, frozen=True):
    """``GET /server_info`` (alias ``/get_server_info``): server args + scheduler info."""

    model_path: str | None = None
    served_model_name: str | None = None
    tp_size: int | None = None
    dp_size: int | None = None
    enable_dp_attention: bool | None = None
    disaggregation_mode: str | None = None
    disaggregation_bootstrap_port: int | None = None
    page_size: int | None = None
    max_total_num_tokens: int | None = None
    max_running_requests: int | None = None
    context_length: int | None = None
    max_req_input_len: int | None = None
    speculative_algorithm: str | None = None
    version: str | None = None
    # One entry per DP rank; only its length is used (mini_lb's DP size), so entries stay undecoded.
    internal_states: list[msgspec.Raw] | None = None
    # Speed seeds a server may advertise (the Cachet simulator does; real SGLang does not).
    prefill_tokens_per_s: float | None = None
    decode_step_s: float | None = None

    def effective_dp_size(self) -> int:
        if self.dp_size is not None and self.dp_size >= 1:
            return self.dp_size
        if self.internal_states:
            return len(self.internal_states)
        return 1

    def served_name(self) -> str | None:
        return self.served_model_name or self.model_path


class ModelInfo(msgspec.Struct, frozen=True):
    """``GET /model_info`` (alias ``/get_model_info``)."""

    model_path: str | None = None
    is_generation: bool | None = None
    model_type: str | None = None
    weight_version: str | None = None


class ModelCard(msgspec.Struct, frozen=True):
    id: str
    max_model_len: int | None = None
    parent: str | None = None


class ModelList(msgspec.Struct, frozen=True):
    """``GET /v1/models``: the served name and context length."""

    data: list[ModelCard] = []


class RankLoadReport(msgspec.Struct, frozen=True):
    """One DP rank's load as a server reported it, normalised across endpoint versions.

    ``running``/``waiting`` are None when the endpoint did not report them (pre-2025-09 ``/get_load``).
    """

    dp_rank: int
    running: int | None
    waiting: int | None
    used_tokens: int | None = None
    token_usage: float | None = None
    waiting_uncached_tokens: int | None = None
    gen_throughput: float | None = None
    cache_hit_rate: float | None = None


class _V1LoadEntry(msgspec.Struct, frozen=True):
    dp_rank: int = 0
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    num_waiting_uncached_tokens: int | None = None
    num_used_tokens: int | None = None
    max_total_num_tokens: int | None = None
    token_usage: float | None = None
    gen_throughput: float | None = None
    cache_hit_rate: float | None = None


class _V1Loads(msgspec.Struct, frozen=True):
    # 2026-01-14..2026-05-29 servers add "dp_rank_count" and "aggregate"; per-rank entries suffice.
    loads: list[_V1LoadEntry] = []


class _GetLoadEntry(msgspec.Struct, frozen=True):
    dp_rank: int = 0
    # running + waiting
    num_reqs: int = 0
    num_waiting_reqs: int = 0
    # KV tokens in use on the rank
    num_tokens: int | None = None
    num_pending_tokens: int | None = None


class _LegacyLoad(msgspec.Struct, frozen=True):
    # Before 2025-09: one number for the whole server, KV tokens in use plus tokens of queued prompts.
    load: int


_v1_loads_decoder = msgspec.json.Decoder(_V1Loads)
_get_load_decoder = msgspec.json.Decoder(list[_GetLoadEntry] | _LegacyLoad)
_server_info_decoder = msgspec.json.Decoder(ServerInfo)
_model_info_decoder = msgspec.json.Decoder(ModelInfo)
_model_list_decoder = msgspec.json.Decoder(ModelList)


def parse_server_info(body: bytes) -> ServerInfo:
    """Raises msgspec.DecodeError / msgspec.ValidationError on a malformed body."""
    return _server_info_decoder.decode(body)


def parse_model_info(body: bytes) -> ModelInfo:
    return _model_info_decoder.decode(body)


def parse_model_list(body: bytes) -> ModelList:
    return _model_list_decoder.decode(body)


def _usage(used: int | None, capacity: int | None) -> float | None:
    if used is None or not capacity:
        return None
    return used / capacity


def parse_v1_loads(body: bytes, max_total_num_tokens: int | None = None) -> list[RankLoadReport]:
    """``GET /v1/loads`` (any version). ``max_total_num_tokens`` fills token_usage if absent."""
    reports = []
    for entry in _v1_loads_decoder.decode(body).loads:
        usage = entry.token_usage
        if usage is None:
            usage = _usage(entry.num_used_tokens, entry.max_total_num_tokens or max_total_num_tokens)
        reports.append(
            RankLoadReport(
                dp_rank=entry.dp_rank,
                running=entry.num_running_reqs,
                waiting=entry.num_waiting_reqs,
                used_tokens=entry.num_used_tokens,
                token_usage=usage,
                waiting_uncached_tokens=entry.num_waiting_uncached_tokens,
                gen_throughput=entry.gen_throughput,
                cache_hit_rate=entry.cache_hit_rate,
            )
        )
    return reports


def parse_get_load(body: bytes, max_total_num_tokens: int | None = None) -> list[RankLoadReport]:
    """``GET /get_load`` in all three historical shapes.

    Per-rank list: ``num_reqs`` counts running + waiting, so running = num_reqs - num_waiting_reqs.
    Legacy ``{"load": n}``: only a token count for the whole server; reported as rank 0 with unknown
    request counts, its token usage relative to ``max_total_num_tokens`` when that is known.
    """
    decoded = _get_load_decoder.decode(body)
    if isinstance(decoded, _LegacyLoad):
        return [
            RankLoadReport(
                dp_rank=0,
                running=None,
                waiting=None,
                used_tokens=decoded.load,
                token_usage=_usage(decoded.load, max_total_num_tokens),
            )
        ]
    return [
        RankLoadReport(
            dp_rank=entry.dp_rank,
            running=max(entry.num_reqs - entry.num_waiting_reqs, 0),
            waiting=entry.num_waiting_reqs,
            used_tokens=entry.num_tokens,
            token_usage=_usage(entry.num_tokens, max_total_num_tokens),
            # Prompt tokens queued on the rank: the nearest thing this endpoint has to uncached work.
            waiting_uncached_tokens=entry.num_pending_tokens,
        )
        for entry in decoded
    ]
