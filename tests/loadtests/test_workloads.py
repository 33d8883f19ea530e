from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from backends.sim.engine import Tokenizer
from loadtests.workloads import (
    BenchRequest,
    block_text,
    dump_jsonl,
    filler_text,
    generated_shared_prefix,
    load_jsonl,
    mooncake_prompt,
    mooncake_trace,
    multi_round_chat,
    zipf_group_sizes,
)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer()


def test_filler_text_is_exact_in_simulator_tokens_and_deterministic(tokenizer: Tokenizer) -> None:
    for tokens in (1, 7, 512, 3000):
        text = filler_text("seed", tokens)
        assert len(tokenizer.encode(text)) == tokens
    assert filler_text("a", 100) == filler_text("a", 100)
    assert filler_text("a", 100)[:40] != filler_text("b", 100)[:40]
    assert filler_text("x", 0) == ""


def test_shared_prefix_groups_share_system_prompt_and_hit_token_targets(tokenizer: Tokenizer) -> None:
    requests = generated_shared_prefix(
        groups=4,
        prompts_per_group=5,
        system_tokens=300,
        question_tokens=40,
        output_tokens=16,
        rate_per_s=50.0,
    )
    assert len(requests) == 20
    by_group: dict[str, set[str]] = {}
    for r in requests:
        assert r.messages is not None and r.max_tokens == 16
        system, question = r.messages
        by_group.setdefault(r.group, set()).add(system["content"])
        assert len(tokenizer.encode(system["content"])) == 300
        assert len(tokenizer.encode(question["content"])) == 40
    assert len(by_group) == 4 and all(len(s) == 1 for s in by_group.values())
    assert len({next(iter(s)) for s in by_group.values()}) == 4
    arrivals = [r.arrival_s for r in requests]
    assert all(a > 0 for a in arrivals)
    # Poisson at 50/s: 20 arrivals should take well under 5 s and more than 0.05 s.
    assert 0.05 < max(arrivals) < 5.0


def test_zipf_group_sizes_sum_and_skew() -> None:
    sizes = zipf_group_sizes(10, 200, 1.2)
    assert sum(sizes) == 200
    assert sizes == sorted(sizes, reverse=True)
    assert min(sizes) >= 1
    assert sizes[0] > 4 * sizes[-1]
    assert zipf_group_sizes(4, 8, 0.0) == [2, 2, 2, 2]
    with pytest.raises(ValueError):
        zipf_group_sizes(5, 3, 1.0)
    requests = generated_shared_prefix(
        groups=6, prompts_per_group=10, zipf_exponent=1.0, system_tokens=8, question_tokens=4
    )
    counts = sorted((sum(1 for r in requests if r.group == f"g{g}") for g in range(6)), reverse=True)
    assert counts == zipf_group_sizes(6, 60, 1.0)


def test_multi_round_history_grows_and_chains(tokenizer: Tokenizer) -> None:
    requests = multi_round_chat(
        users=3,
        rounds=4,
        system_tokens=50,
        user_context_tokens=30,
        question_tokens=10,
        answer_tokens=20,
        think_s=1.5,
        user_rate_per_s=None,
    )
    assert len(requests) == 12
    user0 = [r for r in requests if r.group == "u0"]
    assert [r.after for r in user0] == [None, "chat-u0-r0", "chat-u0-r1", "chat-u0-r2"]
    for earlier, later in itertools.pairwise(user0):
        assert earlier.messages is not None and later.messages is not None
        assert later.messages[: len(earlier.messages)] == earlier.messages
        assert later.messages[len(earlier.messages)]["role"] == "assistant"
        assert later.think_s == 1.5
        assert later.target_prompt_tokens == earlier.target_prompt_tokens + 20 + 10
    # Every user shares the system prompt; per-user context differs.
    systems = {r.messages[0]["content"] for r in requests if r.messages}
    assert len(systems) == 1
    assert user0[0].target_prompt_tokens == 50 + 30 + 10


def test_mooncake_blocks_are_deterministic_distinct_and_exact(tokenizer: Tokenizer) -> None:
    assert block_text(7) == block_text(7)
    assert block_text(7)[:30] != block_text(8)[:30]
    assert len(tokenizer.encode(block_text(7))) == 512
    assert block_text(7, 100) == block_text(7)[: len(block_text(7, 100))]
    prompt = mooncake_prompt([1, 2, 3], 1100)
    assert len(tokenizer.encode(prompt)) == 1100
    assert prompt.startswith(block_text(1) + block_text(2))
    with pytest.raises(ValueError):
        mooncake_prompt([1, 2], 2000)


def test_mooncake_trace_shares_prefixes_exactly_where_block_ids_do(
    tmp_path: Path, tokenizer: Tokenizer
) -> None:
    trace = tmp_path / "trace.jsonl"
    rows = [
        {"timestamp": 0, "input_length": 1200, "output_length": 5, "hash_ids": [0, 1, 2]},
        {"timestamp": 1000, "input_length": 1500, "output_length": 0, "hash_ids": [0, 1, 9]},
        {"timestamp": 3000, "input_length": 600, "output_length": 7, "hash_ids": [4, 5]},
    ]
    trace.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    first, second, third = mooncake_trace(trace, time_scale=0.5)
    assert [r.arrival_s for r in (first, second, third)] == [0.0, 0.5, 1.5]
    assert second.max_tokens == 1  # an output of 0 still asks for one token
    assert first.prompt is not None and second.prompt is not None and third.prompt is not None
    a, b = tokenizer.encode(first.prompt), tokenizer.encode(second.prompt)
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert shared == 1024  # exactly the two common 512-token blocks
    assert len(a) == 1200 and len(b) == 1500 and len(tokenizer.encode(third.prompt)) == 600
    assert second.block_ids == (0, 1, 9)
    assert [r.rid for r in mooncake_trace(trace, limit=2)] == ["mc-0", "mc-1"]
    assert [r.arrival_s for r in mooncake_trace(trace, start_s=1.0)] == [0.0, 2.0]


def test_real_trace_first_requests_have_their_input_length(tokenizer: Tokenizer) -> None:
    for request in mooncake_trace(limit=3):
        assert request.prompt is not None
        assert len(tokenizer.encode(request.prompt)) == request.target_prompt_tokens


def test_requests_round_trip_jsonl_and_reject_bad_shapes(tmp_path: Path) -> None:
    requests = generated_shared_prefix(groups=2, prompts_per_group=2, system_tokens=5, question_tokens=3)
    path = tmp_path / "w.jsonl"
    assert dump_jsonl(requests, path) == 4
    assert list(load_jsonl(path)) == requests
    with pytest.raises(ValueError):
        BenchRequest(rid="x", arrival_s=0.0, max_tokens=1)
    with pytest.raises(ValueError):
        BenchRequest(rid="x", arrival_s=0.0, max_tokens=0, prompt="hi")
