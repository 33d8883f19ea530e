"""Which targets probably hold which prompt blocks: a pure, I/O-free data structure.

Each target has an LRU of block hashes bounded by a budget (its KV capacity in blocks); each block
maps to a bitmask of the targets holding it. A lookup walks the request's chained hashes once,
AND-ing bitmasks — one dict lookup and one big-int AND per block however many targets there are —
and reports, deepest first, how many leading blocks each target holds.

A request's blocks are recorded deepest first, so the root of a prompt is the most recently used
entry and LRU eviction removes leaves before the prefix they hang from, as a radix cache does.
Every record carries a stamp; the stamps a match saw let a later correction say "everything this
target has not touched since stamp s is gone" (strict LRU on the server).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from policies.types import TargetKey

__all__ = ["Match", "PrefixIndex"]


class Match:
    """One target's match: it holds the request's first ``blocks`` blocks."""

    __slots__ = ("blocks", "target")

    def __init__(self, target: TargetKey, blocks: int) -> None:
        self.target = target
        self.blocks = blocks

    def __repr__(self) -> str:
        return f"Match({self.target.label()}, {self.blocks})"


class _Slot:
    __slots__ = ("bit", "budget", "lru", "target")

    def __init__(self, target: TargetKey, bit: int, budget: int) -> None:
        self.target = target
        self.bit = bit
        self.budget = budget
        self.lru: OrderedDict[int, int] = OrderedDict()  # hash -> stamp, least recent first


class PrefixIndex:
    def __init__(self, *, default_budget_blocks: int = 65_536) -> None:
        self._default_budget = default_budget_blocks
        self._slots: dict[TargetKey, _Slot] = {}
        self._by_position: dict[int, _Slot] = {}
        self._free_positions: list[int] = []
        self._holders: dict[int, int] = {}  # hash -> bitmask of slot positions
        self._stamp = 0
        self._entries = 0

    # -- targets ---------------------------------------------------------------------------------

    def _slot(self, target: TargetKey) -> _Slot:
        slot = self._slots.get(target)
        if slot is None:
            position = self._free_positions.pop() if self._free_positions else len(self._slots)
            slot = _Slot(target, position, self._default_budget)
            self._slots[target] = slot
            self._by_position[position] = slot
        return slot

    def targets(self) -> list[TargetKey]:
        return list(self._slots)

    def set_budget(self, target: TargetKey, blocks: int) -> int:
        """Bound ``target`` to ``blocks`` entries, evicting least recent ones; returns how many went."""
        slot = self._slot(target)
        slot.budget = max(blocks, 1)
        return self._trim(slot)

    def budget(self, target: TargetKey) -> int:
        slot = self._slots.get(target)
        return slot.budget if slot is not None else self._default_budget

    def remove_target(self, target: TargetKey) -> None:
        slot = self._slots.pop(target, None)
        if slot is None:
            return
        mask = ~(1 << slot.bit)
        holders = self._holders
        for block in slot.lru:
            remaining = holders[block] & mask
            if remaining:
                holders[block] = remaining
            else:
                del holders[block]
        self._entries -= len(slot.lru)
        del self._by_position[slot.bit]
        self._free_positions.append(slot.bit)

    # -- sizes -----------------------------------------------------------------------------------

    def __len__(self) -> int:
        """(block, target) entries held."""
        return self._entries

    def blocks_on(self, target: TargetKey) -> int:
        slot = self._slots.get(target)
        return len(slot.lru) if slot is not None else 0

    def held_blocks(self, target: TargetKey) -> list[int]:
        """Every block ``target`` holds, least recently used first."""
        slot = self._slots.get(target)
        return list(slot.lru) if slot is not None else []

    def holds(self, target: TargetKey, block: int) -> bool:
        slot = self._slots.get(target)
        return slot is not None and block in slot.lru

    # -- lookups ---------------------------------------------------------------------------------

    def match(self, hashes: Sequence[int], *, limit: int = 64, rotate: int = 0) -> list[Match]:
        """Targets holding a leading run of ``hashes``, deepest first, at most ``limit`` of them.

        When more targets tie at the cut-off depth than fit, which of them are returned rotates
        with ``rotate`` (pass a random number) so no fixed subset is always favoured.
        """
        if not hashes:
            return []
        holders = self._holders
        alive = holders.get(hashes[0], 0)
        if not alive:
            return []
        groups: list[tuple[int, int]] = []  # (depth, mask of targets whose run ends at depth)
        depth = 1
        for block in hashes[1:]:
            still = alive & holders.get(block, 0)
            if still != alive:
                groups.append((depth, alive ^ still))
                if not still:
                    break
                alive = still
            depth += 1
        else:
            groups.append((depth, alive))
        out: list[Match] = []
        by_position = self._by_position
        for depth, mask in reversed(groups):
            room = limit - len(out)
            if room <= 0:
                break
            if mask.bit_count() <= room:
                positions = _bits(mask, room)
            else:
                # Too many ties: start at a rotating bit position, take ``room`` of them.
                width = mask.bit_length()
                shift = rotate % width
                wrapped = (mask >> shift) | ((mask & ((1 << shift) - 1)) << (width - shift))
                positions = [(p + shift) % width for p in _bits(wrapped, room)]
            out.extend(Match(by_position[p].target, depth) for p in positions)
        return out

    def stamps(self, target: TargetKey, hashes: Sequence[int]) -> tuple[int, ...]:
        """The recency stamps ``target`` holds for the leading ``hashes`` (stops at the first miss)."""
        slot = self._slots.get(target)
        if slot is None or not hashes:
            return ()
        found = [slot.lru.get(block) for block in hashes]
        if None in found:
            found = found[: found.index(None)]
        return tuple(found)  # type: ignore[arg-type]  # the Nones were cut off

    # -- updates ---------------------------------------------------------------------------------

    def record(self, target: TargetKey, hashes: Sequence[int]) -> int:
        """``target`` now holds ``hashes`` (a request was routed there). Returns the stamp used."""
        self._stamp += 1
        stamp = self._stamp
        slot = self._slot(target)
        lru = slot.lru
        bit = 1 << slot.bit
        holders = self._holders
        added = 0
        for block in reversed(hashes):
            if block in lru:
                lru.move_to_end(block)
            else:
                holders[block] = holders.get(block, 0) | bit
                added += 1
            lru[block] = stamp
        self._entries += added
        self._trim(slot)
        return stamp

    def drop(self, target: TargetKey, hashes: Iterable[int]) -> int:
        """``target`` no longer holds ``hashes``. Returns how many were held."""
        slot = self._slots.get(target)
        if slot is None:
            return 0
        lru = slot.lru
        dropped = 0
        for block in hashes:
            if lru.pop(block, None) is not None:
                self._unhold(block, slot.bit)
                dropped += 1
        self._entries -= dropped
        return dropped

    def evict_through(self, target: TargetKey, stamp: int) -> list[int]:
        """Evict every entry of ``target`` not used since ``stamp`` (inclusive); returns their hashes."""
        slot = self._slots.get(target)
        if slot is None:
            return []
        lru = slot.lru
        evicted: list[int] = []
        while lru:
            block, seen = next(iter(lru.items()))
            if seen > stamp:
                break
            lru.popitem(last=False)
            self._unhold(block, slot.bit)
            evicted.append(block)
        self._entries -= len(evicted)
        return evicted

    def clear_target(self, target: TargetKey) -> int:
        """Forget everything ``target`` holds (it flushed its cache or restarted)."""
        slot = self._slots.get(target)
        if slot is None:
            return 0
        count = len(slot.lru)
        for block in slot.lru:
            self._unhold(block, slot.bit)
        slot.lru.clear()
        self._entries -= count
        return count

    def _trim(self, slot: _Slot) -> int:
        lru = slot.lru
        excess = len(lru) - slot.budget
        if excess <= 0:
            return 0
        for _ in range(excess):
            block, _stamp = lru.popitem(last=False)
            self._unhold(block, slot.bit)
        self._entries -= excess
        return excess

    def _unhold(self, block: int, position: int) -> None:
        remaining = self._holders[block] & ~(1 << position)
        if remaining:
            self._holders[block] = remaining
        else:
            del self._holders[block]


def _bits(mask: int, limit: int) -> list[int]:
    """Positions of the lowest ``limit`` set bits of ``mask``."""
    positions: list[int] = []
    while mask and len(positions) < limit:
        low = mask & -mask
        positions.append(low.bit_length() - 1)
        mask ^= low
    return positions
