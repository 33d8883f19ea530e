"""How to talk to SGLang servers of every age: request shaping, PD pairing, info/load decoding.

body, headers = shape_request(worker, "generate", body, headers, dp_rank=3)
d = dialect(worker.version)            # rank key, loads endpoint
reports = parse_v1_loads(raw) / parse_get_load(raw)
bootstrap = bootstrap_for(prefill_worker, rng)
pd = shape_pd_requests(endpoint=..., body=..., bootstrap=bootstrap, prefill=..., decode=..., ...)
"""

from __future__ import annotations

from backends.sglang.pd import (
    DEFAULT_BOOTSTRAP_PORT,
    Bootstrap,
    PdRequests,
    bootstrap_for,
    bootstrap_members,
    new_bootstrap_room,
    shape_pd_requests,
)
from backends.sglang.shaping import (
    DP_RANK_HEADER,
    NotAJsonObject,
    ServerLike,
    append_json_members,
    dp_rank_headers,
    encode_members,
    rank_members,
    shape_generate_body,
    shape_request,
)
from backends.sglang.versions import (
    ROUTED_DP_RANK_SINCE,
    SERVER_INFO_SINCE,
    V1_LOADS_SINCE,
    Dialect,
    RankKey,
    dialect,
    parse_version,
    release_date,
)
from backends.sglang.wire import (
    ModelInfo,
    ModelList,
    RankLoadReport,
    ServerInfo,
    parse_get_load,
    parse_model_info,
    parse_model_list,
    parse_server_info,
    parse_v1_loads,
)

__all__ = [
    "DEFAULT_BOOTSTRAP_PORT",
    "DP_RANK_HEADER",
    "ROUTED_DP_RANK_SINCE",
    "SERVER_INFO_SINCE",
    "V1_LOADS_SINCE",
    "Bootstrap",
    "Dialect",
    "ModelInfo",
    "ModelList",
    "NotAJsonObject",
    "PdRequests",
    "RankKey",
    "RankLoadReport",
    "ServerInfo",
    "ServerLike",
    "append_json_members",
    "bootstrap_for",
    "bootstrap_members",
    "dialect",
    "dp_rank_headers",
    "encode_members",
    "new_bootstrap_room",
    "parse_get_load",
    "parse_model_info",
    "parse_model_list",
    "parse_server_info",
    "parse_v1_loads",
    "parse_version",
    "rank_members",
    "release_date",
    "shape_generate_body",
    "shape_pd_requests",
    "shape_request",
]
