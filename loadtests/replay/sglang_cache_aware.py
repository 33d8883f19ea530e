"""A re-implementation of sglang-router's ``cache_aware`` policy from its documented algorithm, for
what-if replays. It is NOT the real (Rust) binary; the HTTP benchmark runs that one.

sglang-router 0.3.2 (defaults from ``launch_router --help``): one character-level radix tree per
model whose nodes record which workers ("tenants") saw that text and when. Per request:

1. If the router's own in-flight counts are imbalanced — (max − min) > 64 AND max > 1.5 × min —
   send to the least-loaded worker (and still record the text under it).
2. Otherwise find the deepest prefix match; if it covers more than 30% of the request's
   characters, send to the worker owning it, else to the worker with the smallest tree (most cache
   room). Record the text under the chosen worker.
3. Every 60 s, each worker whose tree holds more than 67,108,864 characters loses its least
   recently used leaves until it fits.

Where the original leaves a choice open (which tenant of a node a match returns; ties between
equally small trees) this takes the most recently used tenant, and the first worker in order.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from loadtests.replay._common import common_prefix_length

__all__ = ["CacheAwareConfig", "CharRadixTree", "SglangCacheAware"]


class CacheAwareConfig:
    __slots__ = (
        "balance_abs_threshold",
        "balance_rel_threshold",
        "cache_threshold",
        "eviction_interval_s",
        "max_tree_size",
    )

    def __init__(
        self,
        *,
        cache_threshold: float = 0.3,
        balance_abs_threshold: int = 64,
        balance_rel_threshold: float = 1.5,
        eviction_interval_s: float = 60.0,
        max_tree_size: int = 67_108_864,
    ) -> None:
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.eviction_interval_s = eviction_interval_s
        self.max_tree_size = max_tree_size


class _Node:
    __slots__ = ("children", "parent", "tenants", "text")

    def __init__(self, text: str, parent: _Node | None) -> None:
        self.text = text
        self.parent = parent
        self.children: dict[str, _Node] = {}
        self.tenants: dict[str, float] = {}  # tenant -> last access time


class CharRadixTree:
    """Multi-tenant character radix tree with per-tenant character counts and LRU leaf eviction."""

    def __init__(self) -> None:
        self.root = _Node("", None)
        self.sizes: dict[str, int] = {}

    def add_tenant(self, tenant: str, now: float = 0.0) -> None:
        self.root.tenants.setdefault(tenant, now)
        self.sizes.setdefault(tenant, 0)

    def insert(self, text: str, tenant: str, now: float) -> None:
        node = self.root
        node.tenants[tenant] = now
        self.sizes.setdefault(tenant, 0)
        i = 0
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                leaf = _Node(text[i:], node)
                leaf.tenants[tenant] = now
                node.children[text[i]] = leaf
                self.sizes[tenant] += len(leaf.text)
                return
            common = common_prefix_length(child.text, text[i : i + len(child.text)])
            if common < len(child.text):
                child = self._split(node, child, common)
            if tenant not in child.tenants:
                self.sizes[tenant] += len(child.text)
            child.tenants[tenant] = now
            node = child
            i += len(child.text)

    @staticmethod
    def _split(parent: _Node, child: _Node, at: int) -> _Node:
        middle = _Node(child.text[:at], parent)
        middle.tenants = dict(child.tenants)
        parent.children[middle.text[0]] = middle
        child.text = child.text[at:]
        child.parent = middle
        middle.children[child.text[0]] = child
        return middle

    def prefix_match(self, text: str) -> tuple[int, str | None]:
        """Characters of ``text`` matched by the deepest path, and a tenant holding that path."""
        node = self.root
        i = 0
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                break
            common = common_prefix_length(child.text, text[i : i + len(child.text)])
            i += common
            node = child
            if common < len(child.text):
                break
        if not node.tenants:
            return 0, None
        tenant = max(node.tenants.items(), key=lambda kv: kv[1])[0]
        return i, tenant

    def smallest_tenant(self, order: Sequence[str]) -> str:
        return min(order, key=lambda t: self.sizes.get(t, 0))

    def evict_tenant_to(self, tenant: str, max_size: int) -> int:
        """Drop ``tenant``'s least recently used leaves until it holds at most ``max_size`` chars."""
        size = self.sizes.get(tenant, 0)
        if size <= max_size:
            return 0
        heap: list[tuple[float, int, _Node]] = []
        counter = 0
        stack = [self.root]
        while stack:
            node = stack.pop()
            owned_children = [c for c in node.children.values() if tenant in c.tenants]
            if not owned_children and node is not self.root and tenant in node.tenants:
                heap.append((node.tenants[tenant], counter, node))
                counter += 1
            stack.extend(owned_children)
        heapq.heapify(heap)
        removed = 0
        while size > max_size and heap:
            _, _, node = heapq.heappop(heap)
            del node.tenants[tenant]
            size -= len(node.text)
            removed += len(node.text)
            parent = node.parent
            assert parent is not None
            if not node.tenants and not node.children:
                del parent.children[node.text[0]]
            if (
                parent is not self.root
                and tenant in parent.tenants
                and not any(tenant in c.tenants for c in parent.children.values())
            ):
                heapq.heappush(heap, (parent.tenants[tenant], counter, parent))
                counter += 1
        self.sizes[tenant] = size
        return removed


class SglangCacheAware:
    """The policy's state and decision over worker names (``url@rank`` with --dp-aware)."""

    name = "sglang_cache_aware(reimpl)"

    def __init__(self, workers: Sequence[str], config: CacheAwareConfig | None = None) -> None:
        if not workers:
            raise ValueError("need at least one worker")
        self.config = config if config is not None else CacheAwareConfig()
        self.workers = list(workers)
        self.tree = CharRadixTree()
        for worker in self.workers:
            self.tree.add_tenant(worker)
        self.load: dict[str, int] = dict.fromkeys(self.workers, 0)
        self._next_eviction_s = self.config.eviction_interval_s
        self.imbalanced_decisions = 0
        self.cache_hit_decisions = 0

    def select(self, text: str, now: float) -> str:
        self._maybe_evict(now)
        cfg = self.config
        loads = self.load
        max_load = max(loads.values())
        min_load = min(loads.values())
        imbalanced = max_load - min_load > cfg.balance_abs_threshold
        if imbalanced and max_load > min_load * cfg.balance_rel_threshold:
            chosen = min(self.workers, key=lambda w: loads[w])
            self.imbalanced_decisions += 1
        else:
            matched, tenant = self.tree.prefix_match(text)
            rate = matched / len(text) if text else 0.0
            if rate > cfg.cache_threshold and tenant is not None:
                chosen = tenant
                self.cache_hit_decisions += 1
            else:
                chosen = self.tree.smallest_tenant(self.workers)
        self.tree.insert(text, chosen, now)
        loads[chosen] += 1
        return chosen

    def complete(self, worker: str) -> None:
        self.load[worker] = max(self.load[worker] - 1, 0)

    def _maybe_evict(self, now: float) -> None:
        interval = self.config.eviction_interval_s
        if interval <= 0 or now < self._next_eviction_s:
            return
        for worker in self.workers:
            self.tree.evict_tenant_to(worker, self.config.max_tree_size)
        self._next_eviction_s = now + interval
