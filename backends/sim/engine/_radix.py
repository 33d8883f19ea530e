"""SGLang's radix prefix cache over token ids (mem_cache/radix_cache.py), reduced to what the simulator needs.

Edges hold page-aligned runs of token ids; a node's children are keyed by their first page. Nodes used by
running requests are reference-counted (``lock``) and never evicted; unreferenced leaves are evicted least
recently used first. Recency is a logical tick (no clock), so the cache is deterministic.

Costs: ``match``/``insert`` walk the key once, comparing whole edges as list slices (C speed) and binary
searching only the edge where a mismatch happens; eviction pops a lazy heap of leaves.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence

_PageKey = int | tuple[int, ...]


class RadixNode:
    __slots__ = ("children", "key", "lock_ref", "parent", "serial", "tick")

    def __init__(self, key: list[int], parent: RadixNode | None, tick: int, serial: int) -> None:
        self.key = key
        self.parent = parent
        self.children: dict[_PageKey, RadixNode] = {}
        self.lock_ref = 0
        self.tick = tick
        self.serial = serial


class RadixCache:
    def __init__(self, page_size: int = 1) -> None:
        if page_size < 1:
            raise ValueError("page_size must be >= 1")
        self.page_size = page_size
        self._serials = itertools.count()
        self._tick = 0
        self.root = RadixNode([], None, 0, next(self._serials))
        self.root.lock_ref = 1  # the root is never evicted
        self.total_size = 0  # tokens stored in the tree
        self.protected_size = 0  # tokens in nodes some running request holds
        self._heap: list[tuple[int, int, RadixNode]] = []
        self._node_count = 0

    # -- helpers ---------------------------------------------------------------------------------------------

    @property
    def evictable_size(self) -> int:
        return self.total_size - self.protected_size

    def _page_key(self, key: Sequence[int], start: int) -> _PageKey:
        if self.page_size == 1:
            return key[start]
        return tuple(key[start : start + self.page_size])

    def _common_len(self, edge: list[int], key: Sequence[int], start: int) -> int:
        """Length of the common prefix of ``edge`` and ``key[start:]``, rounded down to whole pages."""
        limit = min(len(edge), len(key) - start)
        limit -= limit % self.page_size
        if edge[:limit] == key[start : start + limit]:
            return limit
        lo, hi = 0, limit // self.page_size  # pages known equal / upper bound (exclusive of mismatch)
        while lo + 1 < hi:
            mid = (lo + hi) // 2
            end = mid * self.page_size
            if edge[:end] == key[start : start + end]:
                lo = mid
            else:
                hi = mid
        return lo * self.page_size

    def _next_tick(self) -> int:
        self._tick += 1
        return self._tick

    def _push_if_evictable(self, node: RadixNode) -> None:
        if node.lock_ref == 0 and not node.children and node is not self.root:
            heapq.heappush(self._heap, (node.tick, node.serial, node))

    def _split(self, child: RadixNode, length: int) -> RadixNode:
        """Cut ``child``'s edge after ``length`` tokens; returns the new upper node."""
        parent = child.parent
        assert parent is not None
        upper = RadixNode(child.key[:length], parent, child.tick, next(self._serials))
        upper.lock_ref = child.lock_ref
        child.key = child.key[length:]
        child.parent = upper
        upper.children[self._page_key(child.key, 0)] = child
        parent.children[self._page_key(upper.key, 0)] = upper
        self._node_count += 1
        return upper

    # -- public API ------------------------------------------------------------------------------------------

    def match(self, key: Sequence[int]) -> tuple[int, RadixNode]:
        """Longest cached page-aligned prefix of ``key``: (length, deepest node). Marks the path as used."""
        tick = self._next_tick()
        usable = len(key) - len(key) % self.page_size
        node = self.root
        node.tick = tick
        pos = 0
        while pos < usable:
            child = node.children.get(self._page_key(key, pos))
            if child is None:
                break
            common = self._common_len(child.key, key, pos)
            child.tick = tick
            if common < len(child.key):
                if common > 0:
                    node = self._split(child, common)
                    pos += common
                break
            node = child
            pos += common
        return pos, node

    def peek(self, key: Sequence[int]) -> int:
        """Like :meth:`match` but changes nothing (no split, no recency update): for load estimates."""
        usable = len(key) - len(key) % self.page_size
        node = self.root
        pos = 0
        while pos < usable:
            child = node.children.get(self._page_key(key, pos))
            if child is None:
                break
            common = self._common_len(child.key, key, pos)
            pos += common
            if common < len(child.key):
                break
            node = child
        return pos

    def insert(self, key: Sequence[int]) -> tuple[int, RadixNode]:
        """Insert the page-aligned part of ``key``. Returns (tokens that were already cached, last node)."""
        tick = self._next_tick()
        usable = len(key) - len(key) % self.page_size
        node = self.root
        node.tick = tick
        pos = 0
        while pos < usable:
            child = node.children.get(self._page_key(key, pos))
            if child is None:
                break
            common = self._common_len(child.key, key, pos)
            child.tick = tick
            if common < len(child.key):
                node = self._split(child, common)
                pos += common
                break
            node = child
            pos += common
        already = pos
        if pos < usable:
            leaf = RadixNode(list(key[pos:usable]), node, tick, next(self._serials))
            node.children[self._page_key(leaf.key, 0)] = leaf
            self.total_size += len(leaf.key)
            self._node_count += 1
            self._push_if_evictable(leaf)
            node = leaf
        return already, node

    def lock(self, node: RadixNode) -> None:
        """A running request now uses the path root..node: protect it from eviction."""
        current: RadixNode | None = node
        while current is not None and current is not self.root:
            if current.lock_ref == 0:
                self.protected_size += len(current.key)
            current.lock_ref += 1
            current = current.parent

    def unlock(self, node: RadixNode) -> None:
        current: RadixNode | None = node
        while current is not None and current is not self.root:
            if current.lock_ref <= 0:
                raise AssertionError("radix cache: unlock without lock")
            current.lock_ref -= 1
            if current.lock_ref == 0:
                self.protected_size -= len(current.key)
                self._push_if_evictable(current)
            current = current.parent

    def evict(self, num_tokens: int) -> int:
        """Free at least ``num_tokens`` tokens of unreferenced leaves, least recently used first."""
        freed = 0
        heap = self._heap
        while freed < num_tokens and heap:
            tick, _, node = heapq.heappop(heap)
            if node.parent is None or node.children or node.lock_ref > 0:
                continue  # stale: evicted already, grew children, or locked again
            if node.tick != tick:
                heapq.heappush(heap, (node.tick, node.serial, node))
                continue
            parent = node.parent
            del parent.children[self._page_key(node.key, 0)]
            node.parent = None
            freed += len(node.key)
            self.total_size -= len(node.key)
            self._node_count -= 1
            self._push_if_evictable(parent)
        if len(heap) > 4 * self._node_count + 1024:
            self._rebuild_heap()
        return freed

    def _rebuild_heap(self) -> None:
        entries: list[tuple[int, int, RadixNode]] = []
        stack = [self.root]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node.lock_ref == 0 and not node.children and node is not self.root:
                entries.append((node.tick, node.serial, node))
        heapq.heapify(entries)
        self._heap = entries

    def reset(self) -> None:
        """Drop everything (``/flush_cache``). Only valid when no request holds a lock."""
        if self.protected_size:
            raise AssertionError("radix cache: reset while nodes are locked")
        self.root.children.clear()
        self.total_size = 0
        self._heap = []
        self._node_count = 0
