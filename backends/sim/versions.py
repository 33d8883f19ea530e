"""Which wire behaviour a simulated server of a given SGLang version shows.

SGLang changed its HTTP protocol several times (see the wire-protocol reference); a gateway must cope with
servers of every age, so the simulator can pretend to be any of them. Behaviour is keyed by the date a change
landed on SGLang's main branch; a version string maps to a release date, and `--sglang-version` also takes a
date (YYYY-MM-DD) to sit exactly on either side of a change. Dates up to 0.5.6 are the releases' (to the
week); later ones are assumed (roughly monthly) — what matters is which side of each change a version is on:

    version  date        /generate DP key                 /get_load        /v1/loads            info paths
    0.5.0    2025-08-12  data_parallel_rank               {"load": n}      404                  get_* only
    0.5.2    2025-09-11  data_parallel_rank               per-rank list    404                  get_* only
    0.5.6    2025-12-03  data_parallel_rank               per-rank list    404                  + /server_info
    0.5.8    2026-01-28  data_parallel_rank               per-rank list    + aggregate          + /server_info
    0.5.10   2026-03-16  routed_dp_rank (+ old alias)     per-rank list    + aggregate          + /server_info
    0.5.12   2026-05-06  routed_dp_rank (+ old alias)     + pending, ts    + aggregate          + /server_info
    0.5.13   2026-05-31  routed_dp_rank (+ old alias)     + pending, ts    no aggregate         + kv_events
    0.5.15   2026-07-14  routed_dp_rank only              + pending, ts    no aggregate         + kv_events
    (/v1/* accept both keys from 2026-02-24, only data_parallel_rank before; structured stream error chunks
    from 2026-06-06; short meta_info before 2025-09; tokenizer metrics' engine_type label from 2026-04-28.)
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

# Release dates used to place a version relative to the protocol changes below (approximate, see module doc).
RELEASE_DATES: dict[str, dt.date] = {
    "0.5.0": dt.date(2025, 8, 12),
    "0.5.1": dt.date(2025, 8, 23),
    "0.5.2": dt.date(2025, 9, 11),
    "0.5.3": dt.date(2025, 10, 6),
    "0.5.4": dt.date(2025, 10, 26),
    "0.5.5": dt.date(2025, 11, 6),
    "0.5.6": dt.date(2025, 12, 3),
    "0.5.7": dt.date(2026, 1, 5),
    "0.5.8": dt.date(2026, 1, 28),
    "0.5.9": dt.date(2026, 2, 20),
    "0.5.10": dt.date(2026, 3, 16),
    "0.5.11": dt.date(2026, 4, 10),
    "0.5.12": dt.date(2026, 5, 6),
    "0.5.13": dt.date(2026, 5, 31),
    "0.5.14": dt.date(2026, 6, 25),
    "0.5.15": dt.date(2026, 7, 14),
}
NEWEST_VERSION = "0.5.15"

# Protocol changes, by the date they landed (wire-protocol reference).
# weight_version, num_retractions, dp_rank... in meta_info (assumed; the reference: Aug 2025 lacked them)
EXTENDED_META_INFO = dt.date(2025, 9, 1)
GET_LOAD_LIST = dt.date(2025, 9, 1)  # /get_load: {"load":n} -> per-rank list
NEW_INFO_PATHS = dt.date(2025, 11, 17)  # /model_info and /server_info (the get_* forms stay as aliases)
V1_LOADS = dt.date(2026, 1, 14)  # /v1/loads appears, with dp_rank_count + aggregate
ROUTED_DP_RANK = dt.date(2026, 2, 24)  # routed_dp_rank replaces data_parallel_rank (alias period begins)
TOKENIZER_ENGINE_TYPE_LABEL = dt.date(2026, 4, 28)  # tokenizer metrics gain engine_type
GET_LOAD_PENDING = dt.date(2026, 5, 1)  # /get_load entries gain num_pending_tokens + ts_tic
KV_EVENTS_IN_SERVER_INFO = dt.date(2026, 5, 23)
V1_LOADS_NO_AGGREGATE = dt.date(2026, 5, 29)  # aggregate + dp_rank_count dropped
STRUCTURED_STREAM_ERRORS = dt.date(2026, 6, 6)  # stream error chunk gains type/code/retryable
DATA_PARALLEL_RANK_IGNORED = dt.date(2026, 6, 24)  # /generate silently ignores data_parallel_rank

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@dataclass(frozen=True, slots=True)
class VersionBehaviour:
    """The protocol facts one server age implies, resolved once at start-up."""

    version: str
    date: dt.date

    @property
    def extended_meta_info(self) -> bool:
        return self.date >= EXTENDED_META_INFO

    @property
    def new_info_paths(self) -> bool:
        return self.date >= NEW_INFO_PATHS

    @property
    def has_v1_loads(self) -> bool:
        return self.date >= V1_LOADS

    @property
    def v1_loads_aggregate(self) -> bool:
        return V1_LOADS <= self.date < V1_LOADS_NO_AGGREGATE

    @property
    def generate_honours_routed_dp_rank(self) -> bool:
        return self.date >= ROUTED_DP_RANK

    @property
    def generate_honours_data_parallel_rank(self) -> bool:
        return self.date < DATA_PARALLEL_RANK_IGNORED

    @property
    def openai_honours_routed_dp_rank(self) -> bool:
        return self.date >= ROUTED_DP_RANK

    @property
    def get_load_shape(self) -> str:
        """ "scalar" ({"load": n}), "list" or "list_pending"."""
        if self.date < GET_LOAD_LIST:
            return "scalar"
        if self.date < GET_LOAD_PENDING:
            return "list"
        return "list_pending"

    @property
    def structured_stream_errors(self) -> bool:
        return self.date >= STRUCTURED_STREAM_ERRORS

    @property
    def kv_events_key(self) -> bool:
        return self.date >= KV_EVENTS_IN_SERVER_INFO

    @property
    def tokenizer_engine_type_label(self) -> bool:
        return self.date >= TOKENIZER_ENGINE_TYPE_LABEL


def resolve_version(spec: str | None) -> VersionBehaviour:
    """Accept a known version ("0.5.9", "v0.5.9", "0.5.9.post1") or a date ("2026-03-01")."""
    if spec is None or spec in ("", "latest", "newest"):
        return VersionBehaviour(NEWEST_VERSION, RELEASE_DATES[NEWEST_VERSION])
    text = spec.strip()
    if _DATE.match(text):
        return VersionBehaviour(_newest_version_at(dt.date.fromisoformat(text)), dt.date.fromisoformat(text))
    base = text.removeprefix("v")
    base = re.split(r"\.post|rc|\+", base)[0]
    if base not in RELEASE_DATES:
        known = ", ".join(RELEASE_DATES)
        raise ValueError(f"unknown SGLang version {spec!r}; known: {known}, or give a date YYYY-MM-DD")
    return VersionBehaviour(text.removeprefix("v"), RELEASE_DATES[base])


def _newest_version_at(date: dt.date) -> str:
    released = [v for v, d in RELEASE_DATES.items() if d <= date]
    return released[-1] if released else "0.5.0"
