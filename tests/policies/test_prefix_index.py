from __future__ import annotations

import itertools

import pytest

from policies.prefix import canonical_chat, hash_bytes_blocks, hash_id_blocks
from policies.prefix_index import PrefixIndex
from policies.types import TargetKey

A, B, C = TargetKey("http://a"), TargetKey("http://b", 1), TargetKey("http://c")


def test_hashes_are_stable_across_processes() -> None:
    # Pinned values: replicas sharing an index through Redis must agree on every name.
    assert hash_bytes_blocks(b"a" * 512).hashes == (10806427305549343550, 10056421983814911021)
    assert hash_id_blocks(list(range(128))).hashes == (9453972554536839345, 15907847592598508565)


def test_hashes_chain_and_skip_the_partial_tail() -> None:
    one = hash_bytes_blocks(b"x" * 256 + b"y" * 256 + b"tail")
    two = hash_bytes_blocks(b"x" * 256 + b"z" * 256)
    assert len(one.hashes) == 2 and one.length == 516
    assert one.hashes[0] == two.hashes[0] and one.hashes[1] != two.hashes[1]
    # the same block content at depth 1 is a different block than at depth 0
    assert hash_bytes_blocks(b"y" * 256).hashes[0] != one.hashes[1]
    # bytes and ids never share names
    assert hash_id_blocks([0] * 64).hashes[0] != hash_bytes_blocks(bytes(512)).hashes[0]


def test_chat_rendering_is_deterministic_and_role_aware() -> None:
    first = canonical_chat([{"role": "user", "content": "hi", "name": "x", "tool_call_id": "1"}])
    second = canonical_chat([{"tool_call_id": "1", "name": "x", "content": "hi", "role": "user"}])
    assert first == second
    assert canonical_chat([{"role": "user", "content": "hi"}]) != canonical_chat(
        [{"role": "assistant", "content": "hi"}]
    )
    parts = canonical_chat([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert parts == canonical_chat([{"role": "user", "content": "hi"}])
    # a conversation's earlier turns are a prefix of its later rendering
    turn1 = [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"}]
    turn2 = [*turn1, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    assert canonical_chat(turn2).startswith(canonical_chat(turn1))


def test_match_reports_leading_runs_deepest_first() -> None:
    index = PrefixIndex()
    index.record(A, [1, 2, 3, 4])
    index.record(B, [1, 2])
    index.record(C, [9])
    matches = index.match([1, 2, 3, 5])
    assert [(m.target, m.blocks) for m in matches] == [(A, 3), (B, 2)]
    assert index.match([5, 1, 2]) == []
    assert index.match([]) == []
    assert len(index) == 7


def test_match_limit_rotates_among_ties() -> None:
    index = PrefixIndex()
    targets = [TargetKey(f"http://t{i}") for i in range(10)]
    for target in targets:
        index.record(target, [1, 2])
    index.record(targets[9], [1, 2, 3])
    seen: set[TargetKey] = set()
    for rotate in range(10):
        matches = index.match([1, 2, 3], limit=3, rotate=rotate)
        assert matches[0].target == targets[9] and matches[0].blocks == 3
        assert len(matches) == 3
        seen.update(m.target for m in matches[1:])
    assert seen == set(targets[:9])


def test_capacity_bound_evicts_leaves_before_their_prefix() -> None:
    index = PrefixIndex()
    index.set_budget(A, 10)
    index.record(A, list(range(100, 130)))
    assert index.blocks_on(A) == 10
    # the first ten blocks (the prefix) stayed; the deep ones went
    assert [m.blocks for m in index.match(list(range(100, 130)))] == [10]


def test_lru_keeps_what_was_used_recently() -> None:
    index = PrefixIndex()
    index.set_budget(A, 10)
    index.record(A, [1, 2, 3, 4, 5])
    index.record(A, [11, 12, 13, 14, 15])
    index.record(A, [1, 2, 3, 4, 5])  # touch the first prompt again
    index.record(A, [21, 22, 23, 24, 25])
    assert index.match([1, 2, 3, 4, 5])[0].blocks == 5
    assert index.match([11, 12]) == []
    assert index.match([21, 22, 23, 24, 25])[0].blocks == 5
    # shrinking the budget evicts the least recent first
    assert index.set_budget(A, 5) == 5
    assert index.match([1, 2]) == [] and index.blocks_on(A) == 5


def test_evict_through_stamp_drops_everything_older() -> None:
    index = PrefixIndex()
    old = index.record(A, [1, 2, 3])
    index.record(A, [7, 8])
    stamps = index.stamps(A, [1, 2, 3, 4])
    assert stamps == (old, old, old)
    newer = index.record(A, [1])  # the root was used again since
    assert newer > old
    evicted = index.evict_through(A, old)
    assert sorted(evicted) == [2, 3]
    assert index.holds(A, 1) and index.holds(A, 7) and not index.holds(A, 2)


def test_drop_clear_and_remove_free_everything() -> None:
    index = PrefixIndex()
    index.record(A, [1, 2, 3])
    index.record(B, [1, 2, 3])
    assert index.drop(A, [3, 99]) == 1
    assert [(m.target, m.blocks) for m in index.match([1, 2, 3])] == [(B, 3), (A, 2)]
    assert index.clear_target(B) == 3
    index.remove_target(A)
    assert len(index) == 0 and index.match([1]) == []
    index.record(C, [1])  # the freed slot is reused
    assert index.match([1])[0].target == C


@pytest.mark.parametrize("n", [1, 64, 200])
def test_many_targets_bitmask(n: int) -> None:
    index = PrefixIndex()
    targets = [TargetKey(f"http://w{i}", r) for i in range(n) for r in range(2)]
    for depth, target in enumerate(targets):
        index.record(target, list(range(depth % 7 + 1)))
    matches = index.match(list(range(7)), limit=len(targets))
    assert len(matches) == len(targets)
    assert all(a.blocks >= b.blocks for a, b in itertools.pairwise(matches))
    assert matches[0].blocks == min(7, len(targets))
