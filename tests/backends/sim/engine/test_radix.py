"""The radix prefix cache: matching, page alignment, node splits, LRU eviction, reference counting."""

from __future__ import annotations

import random

from backends.sim.engine import RadixCache


def test_match_finds_longest_cached_prefix_and_splits_edges() -> None:
    cache = RadixCache()
    assert cache.insert([1, 2, 3, 4, 5])[0] == 0
    length, node = cache.match([1, 2, 3, 9, 9])
    assert length == 3
    assert node.key == [1, 2, 3]  # the edge was split at the divergence
    assert cache.insert([1, 2, 3, 7])[0] == 3
    assert cache.total_size == 6
    assert cache.match([1, 2, 3, 7, 8])[0] == 4
    assert cache.match([2, 2])[0] == 0
    assert cache.peek([1, 2, 3, 4, 5, 6]) == 5


def test_page_size_truncates_matches_and_inserts_to_whole_pages() -> None:
    cache = RadixCache(page_size=4)
    assert cache.insert(list(range(10)))[0] == 0
    assert cache.total_size == 8  # the 2-token tail is not a whole page
    assert cache.match(list(range(10)))[0] == 8
    assert cache.match([0, 1, 2, 3, 4, 5, 99, 7])[0] == 4  # diverges inside page 2
    assert cache.match([0, 1, 2])[0] == 0


def test_locked_nodes_are_never_evicted() -> None:
    cache = RadixCache()
    _, node = cache.insert([1, 2, 3])
    cache.insert([7, 8])
    cache.lock(node)
    assert cache.protected_size == 3
    assert cache.evict(100) == 2
    assert cache.total_size == 3
    assert cache.match([1, 2, 3, 4])[0] == 3
    cache.unlock(node)
    assert cache.evictable_size == 3
    assert cache.evict(100) == 3
    assert cache.total_size == 0


def test_eviction_is_least_recently_used_first() -> None:
    cache = RadixCache()
    cache.insert([1, 1, 1])
    cache.insert([2, 2, 2])
    cache.insert([3, 3, 3])
    cache.match([1, 1, 1, 0])  # touch the oldest: now [2,2,2] is the least recently used
    assert cache.evict(1) == 3
    assert cache.match([2, 2, 2, 0])[0] == 0
    assert cache.match([1, 1, 1, 0])[0] == 3
    assert cache.match([3, 3, 3, 0])[0] == 3


def test_parent_becomes_evictable_after_its_children_go() -> None:
    cache = RadixCache()
    cache.insert([1, 2, 3, 4])
    cache.insert([1, 2, 3, 5])  # splits: [1,2,3] -> {[4], [5]}
    assert cache.evict(3) == 5  # both 1-token leaves, then the 3-token parent
    assert cache.total_size == 0


def test_random_workload_keeps_sizes_consistent() -> None:
    rng = random.Random(3)
    cache = RadixCache(page_size=2)
    held = []
    for step in range(2000):
        key = [rng.randrange(4) for _ in range(rng.randrange(1, 30))]
        if rng.random() < 0.5:
            cache.insert(key)
        length, node = cache.match(key)
        assert length % 2 == 0 and length <= len(key)
        if rng.random() < 0.3:
            cache.lock(node)
            held.append(node)
        if held and rng.random() < 0.3:
            cache.unlock(held.pop(rng.randrange(len(held))))
        if step % 50 == 0:
            cache.evict(rng.randrange(1, 40))
        assert 0 <= cache.protected_size <= cache.total_size
    for node in held:
        cache.unlock(node)
    cache.evict(10**9)
    assert cache.total_size == 0 and cache.protected_size == 0
