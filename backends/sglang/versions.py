"""Which SGLang server speaks which dialect, decided from its reported version.

The protocol changes the gateway cares about happened on dates (see
/work/shared/docs/sglang-wire-protocol.md), so a version is mapped to the date it was released and
compared with the date of each change:

| change                                                       | date       |
|--------------------------------------------------------------|------------|
| ``/get_load`` becomes a per-rank list (was ``{"load": n}``)  | 2025-09    |
| ``/server_info`` and ``/model_info`` (``/get_*`` aliases)    | 2025-11-17 |
| ``/v1/loads`` (with ``aggregate`` until 2026-05-29)          | 2026-01-14 |
| ``routed_dp_rank`` replaces ``data_parallel_rank``           | 2026-02-24 |
| ``data_parallel_rank`` silently ignored on ``/generate``     | 2026-06-24 |

Release dates come from SGLang's GitHub release tags. Only the versions listed in
``_RELEASE_DATES`` are dated; for any other version (newer than the table, a local build, an empty
string) the date is unknown and every decision falls back to a form that is correct on servers of
either age: both rank keys are sent (in the deprecation window the server copies
``data_parallel_rank`` into ``routed_dp_rank`` only when the latter is unset, older servers ignore
the unknown ``routed_dp_rank``, newer ones ignore ``data_parallel_rank``), and load/info endpoints
are probed, falling back to the other form on 404.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
from collections.abc import Mapping

import msgspec

ROUTED_DP_RANK_SINCE = dt.date(2026, 2, 24)
V1_LOADS_SINCE = dt.date(2026, 1, 14)
SERVER_INFO_SINCE = dt.date(2025, 11, 17)

# version -> release date (GitHub release tags of sgl-project/sglang). Pre-releases and post
# releases (0.5.3rc0, 0.5.3.post1) take the date of the release they belong to: the cut-overs above
# are months apart from every listed release, so that approximation never flips a decision.
ReleaseDates = Mapping[tuple[int, int, int], dt.date]
_RELEASE_DATES: ReleaseDates = {
    (0, 4, 6): dt.date(2025, 4, 27),
    (0, 4, 7): dt.date(2025, 6, 10),
    (0, 4, 8): dt.date(2025, 6, 24),
    (0, 4, 9): dt.date(2025, 7, 5),
    (0, 4, 10): dt.date(2025, 7, 31),
    (0, 5, 1): dt.date(2025, 8, 23),
    (0, 5, 2): dt.date(2025, 9, 11),
    (0, 5, 3): dt.date(2025, 10, 6),
    (0, 5, 4): dt.date(2025, 10, 26),
    (0, 5, 5): dt.date(2025, 11, 6),
    (0, 5, 6): dt.date(2025, 12, 3),
}
_VERSION_RE = re.compile(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?")


class RankKey(enum.StrEnum):
    """How a ``/generate`` body pins a DP rank."""

    ROUTED_DP_RANK = "routed_dp_rank"
    DATA_PARALLEL_RANK = "data_parallel_rank"
    BOTH = "both"


class Dialect(msgspec.Struct, frozen=True):
    """What the gateway needs to know to talk to one server."""

    version: str
    release_date: dt.date | None
    rank_key: RankKey
    # Endpoint to poll first for loads; the other is tried if this one answers 404.
    loads_path: str
    # Endpoint to ask first for server info; the other is tried if this one answers 404.
    server_info_path: str
    model_info_path: str


def parse_version(version: str) -> tuple[int, int, int] | None:
    match = _VERSION_RE.match(version)
    if match is None:
        return None
    return int(match[1]), int(match[2]), int(match[3] or 0)


def release_date(version: str, release_dates: ReleaseDates | None = None) -> dt.date | None:
    """The release date of an SGLang version, or None when the table cannot say.

    Versions older than the oldest listed release are dated to it (they predate every cut-over).
    ``release_dates`` replaces the built-in table (an operator who knows newer releases).
    """
    table = _RELEASE_DATES if release_dates is None else release_dates
    parsed = parse_version(version)
    if parsed is None or not table or parsed > max(table):
        return None
    oldest = min(table)
    if parsed < oldest:
        return table[oldest]
    if parsed in table:
        return table[parsed]
    # An unlisted version between two listed ones (e.g. 0.5.0): the next listed release bounds it.
    later = min(v for v in table if v > parsed)
    return table[later]


def dialect(version: str, release_dates: ReleaseDates | None = None) -> Dialect:
    """The dialect of a server that reports ``version`` (empty or unknown: the age-proof forms)."""
    table = _RELEASE_DATES if release_dates is None else release_dates
    released = release_date(version, table)
    parsed = parse_version(version)
    newer_than_table = parsed is not None and bool(table) and parsed > max(table)
    if released is None:
        rank_key = RankKey.BOTH
    elif released >= ROUTED_DP_RANK_SINCE:
        rank_key = RankKey.ROUTED_DP_RANK
    else:
        rank_key = RankKey.DATA_PARALLEL_RANK
    new_loads = newer_than_table if released is None else released >= V1_LOADS_SINCE
    new_info = newer_than_table or released is None or released >= SERVER_INFO_SINCE
    return Dialect(
        version=version,
        release_date=released,
        rank_key=rank_key,
        loads_path="/v1/loads" if new_loads else "/get_load",
        server_info_path="/server_info" if new_info else "/get_server_info",
        model_info_path="/model_info" if new_info else "/get_model_info",
    )
