from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from loadtests.replay import ClusterSpec, estimate_capacity, estimate_capacity_rps
from loadtests.replay.__main__ import _parser as replay_parser
from loadtests.replay.__main__ import main as replay_main
from loadtests.replay.run import DEFAULT_LOAD_BASIS, LOAD_BASES
from loadtests.routing_bench.__main__ import _parser as bench_parser
from loadtests.workloads import BenchRequest, generated_shared_prefix

SPEC = ClusterSpec(servers=2, dp_size=2)


def _cache_heavy() -> list[BenchRequest]:
    # Four long shared system prompts, short questions: nearly all of the work is the prefixes.
    requests = generated_shared_prefix(
        groups=4, prompts_per_group=12, system_tokens=3000, question_tokens=20, output_tokens=4
    )
    return sorted(requests, key=lambda r: r.arrival_s)


def test_cache_aware_capacity_counts_what_caching_saves_and_records_both_bursts() -> None:
    requests = _cache_heavy()
    rr = asyncio.run(estimate_capacity(requests, SPEC, basis="round-robin"))
    ca = asyncio.run(estimate_capacity(requests, SPEC, basis="cache-aware"))
    assert rr.basis == "round-robin" and rr.policy == "round_robin"
    assert list(rr.measured) == ["round_robin"]
    assert ca.basis == "cache-aware" and set(ca.measured) == {"prefix_aware", "round_robin"}
    # Same burst under round robin in both measurements (deterministic replay).
    assert ca.measured["round_robin"] == pytest.approx(rr.rps)
    # Cache-aware routing reuses the prefixes, so the cluster completes the burst sooner.
    assert ca.policy == "prefix_aware"
    assert ca.hit_rate > rr.hit_rate + 0.2
    assert ca.rps > 1.3 * rr.rps
    assert ca.rps == max(ca.measured.values())
    assert ca.requests == rr.requests == len(requests)
    assert asyncio.run(estimate_capacity_rps(requests, SPEC, basis="round-robin")) == pytest.approx(rr.rps)
    assert "cache-aware basis, set by prefix_aware" in ca.describe()


def test_unknown_load_basis_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown load basis"):
        asyncio.run(estimate_capacity(_cache_heavy(), SPEC, basis="oracle"))


def test_both_harnesses_take_the_same_load_basis_flag() -> None:
    assert DEFAULT_LOAD_BASIS == "cache-aware" and set(LOAD_BASES) == {"cache-aware", "round-robin"}
    for parser in (replay_parser(), bench_parser()):
        assert parser.parse_args([]).load_basis == DEFAULT_LOAD_BASIS
        assert parser.parse_args(["--load-basis", "round-robin"]).load_basis == "round-robin"
        with pytest.raises(SystemExit):
            parser.parse_args(["--load-basis", "fastest"])


def test_replay_prints_and_records_the_basis_and_capacity(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "--workload", "shared-prefix", "--groups", "2", "--prompts-per-group", "4",
        "--system-tokens", "600", "--question-tokens", "20", "--output-tokens", "4",
        "--servers", "2", "--load", "0.5", "--policies", "round_robin", "--out", str(tmp_path),
    ]  # fmt: skip
    for basis in ("round-robin", "cache-aware"):
        assert replay_main([*argv, "--load-basis", basis]) == 0
        out = capsys.readouterr()
        assert f"{basis} basis" in out.err
        assert f"× {basis} capacity" in out.out
        (path,) = tmp_path.glob("replay-*.json")
        payload = json.loads(path.read_text())
        path.unlink()
        assert payload["load"] == 0.5 and payload["load_basis"] == basis
        assert payload["capacity"]["basis"] == basis
        assert payload["capacity_rps_estimate"] == payload["capacity"]["rps"] > 0
        expected = {"round_robin"} if basis == "round-robin" else {"round_robin", "prefix_aware"}
        assert set(payload["capacity"]["measured"]) == expected
