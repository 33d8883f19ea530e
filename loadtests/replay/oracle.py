"""The oracle bound: one infinite cache that sees every request.

For each request in arrival order: the longest prefix of its token ids that any earlier request's
prompt began with. No router can place a request where more of it is cached than that (short of
reordering), so the token-weighted oracle hit rate bounds every policy's.

Prompts are indexed as chained hashes of fixed blocks; within the first unmatched block the match
is extended token by token against every continuation seen after the matched blocks, so the
answer is exact at token granularity.
"""

from __future__ import annotations

from collections.abc import Sequence

from loadtests.replay._common import common_prefix_length

__all__ = ["OracleCache"]

_ROOT = 0x0CAC4E7


class OracleCache:
    def __init__(self, block_tokens: int = 32) -> None:
        if block_tokens < 1:
            raise ValueError("block_tokens must be >= 1")
        self.block_tokens = block_tokens
        self._blocks: set[int] = set()
        # chain hash of the first k blocks -> the distinct next blocks (possibly partial) seen after them
        self._continuations: dict[int, set[tuple[int, ...]]] = {}
        self.seen_tokens = 0
        self.hit_tokens = 0

    def observe(self, ids: Sequence[int]) -> int:
        """Longest previously seen prefix of ``ids`` (in tokens); then remember ``ids``."""
        hit = self.longest_prefix(ids)
        self.insert(ids)
        self.seen_tokens += len(ids)
        self.hit_tokens += hit
        return hit

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.seen_tokens if self.seen_tokens else 0.0

    def longest_prefix(self, ids: Sequence[int]) -> int:
        size = self.block_tokens
        chain = _ROOT
        matched = 0
        full = len(ids) // size
        for k in range(full):
            block = tuple(ids[k * size : (k + 1) * size])
            nxt = hash((chain, block))
            if nxt not in self._blocks:
                break
            chain = nxt
            matched = (k + 1) * size
        tail = tuple(ids[matched : matched + size])
        best = 0
        for continuation in self._continuations.get(chain, ()):
            best = max(best, common_prefix_length(continuation, tail))
            if best == len(tail):
                break
        return matched + best

    def insert(self, ids: Sequence[int]) -> None:
        size = self.block_tokens
        chain = _ROOT
        for start in range(0, len(ids), size):
            block = tuple(ids[start : start + size])
            self._continuations.setdefault(chain, set()).add(block)
            if len(block) < size:
                break
            chain = hash((chain, block))
            self._blocks.add(chain)
