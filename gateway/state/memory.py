"""The embedded store: one gateway process, no other moving part."""

from __future__ import annotations

import heapq
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence

from gateway.state._base import Choice, Lease, ModelState
from policies.types import TargetKey

__all__ = ["MemoryStore"]


class _Held:
    __slots__ = ("expires_at", "lease", "prefill_left")

    def __init__(self, lease: Lease, expires_at: float) -> None:
        self.lease = lease
        self.expires_at = expires_at
        # Prompt tokens still counted as queued prefill on the target (0 once prefill is due).
        self.prefill_left = lease.prefill_tokens


class MemoryStore:
    """Leases and the prefix index in this process. Reserve is check-and-add with no await in
    between, which on one event loop is atomic."""

    name = "memory"
    shared = False

    def __init__(
        self,
        *,
        lease_ttl_s: float = 120.0,
        default_budget_blocks: int = 65_536,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lease_ttl_s = lease_ttl_s
        self._default_budget = default_budget_blocks
        self._clock = clock
        self._models: dict[str, ModelState] = {}
        # Ordered by expiry: every lease has the same TTL and a renewal moves it to the end.
        self._held: OrderedDict[str, _Held] = OrderedDict()
        self._prefill_due: list[tuple[float, str]] = []  # heap of (when prefill is done, lease id)
        self._ids = itertools.count(1)
        self._expired = 0

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def model(self, model: str) -> ModelState:
        state = self._models.get(model)
        if state is None:
            state = self._models[model] = ModelState(self._default_budget)
        return state

    async def ready(self, model: str) -> ModelState:
        self._expire(self._clock())
        return self.model(model)

    def _expire(self, now: float) -> None:
        due = self._prefill_due
        while due and due[0][0] <= now:
            _, lease_id = heapq.heappop(due)
            entry = self._held.get(lease_id)
            if entry is not None and entry.prefill_left:
                self.model(entry.lease.model).add_load(entry.lease.target, 0, -entry.prefill_left)
                entry.prefill_left = 0
        held = self._held
        while held:
            first = next(iter(held.values()))
            if first.expires_at > now:
                return
            held.popitem(last=False)
            lease = first.lease
            self.model(lease.model).add_load(lease.target, -1, -first.prefill_left)
            self._expired += 1

    async def reserve(
        self,
        model: str,
        choices: Sequence[Choice],
        *,
        prefill_tokens: int,
        blocks: Sequence[int],
        prefill_s: float | None = None,
    ) -> Lease:
        return self.reserve_now(
            model, choices, prefill_tokens=prefill_tokens, blocks=blocks, prefill_s=prefill_s
        )

    def reserve_now(
        self,
        model: str,
        choices: Sequence[Choice],
        *,
        prefill_tokens: int,
        blocks: Sequence[int],
        prefill_s: float | None = None,
    ) -> Lease:
        """Synchronous reserve (the embedded store never waits)."""
        if not choices:
            raise ValueError("reserve needs at least one choice")
        now = self._clock()
        self._expire(now)
        state = self.model(model)
        chosen = state.first_within_bound(choices)
        target = choices[chosen].target
        lease = Lease(f"m{next(self._ids)}", model, target, prefill_tokens, choice=chosen)
        self._held[lease.id] = _Held(lease, now + self.lease_ttl_s)
        if prefill_s is not None and prefill_tokens:
            heapq.heappush(self._prefill_due, (now + prefill_s, lease.id))
        state.add_load(target, 1, prefill_tokens)
        if blocks:
            state.index.record(target, blocks)
        return lease

    async def release(
        self, lease: Lease, *, forget: Iterable[int] = (), forget_through_stamp: int | None = None
    ) -> None:
        self.release_now(lease, forget=forget, forget_through_stamp=forget_through_stamp)

    def release_now(
        self, lease: Lease, *, forget: Iterable[int] = (), forget_through_stamp: int | None = None
    ) -> list[int]:
        """Synchronous release; returns the block hashes forgotten on the lease's target."""
        state = self.model(lease.model)
        entry = self._held.pop(lease.id, None)
        if entry is not None:
            state.add_load(lease.target, -1, -entry.prefill_left)
        forgotten: list[int] = []
        if forget_through_stamp is not None:
            forgotten.extend(state.index.evict_through(lease.target, forget_through_stamp))
        forget = list(forget)
        if forget:
            held = [block for block in forget if state.index.holds(lease.target, block)]
            state.index.drop(lease.target, held)
            forgotten.extend(held)
        self._expire(self._clock())
        return forgotten

    async def renew(self, leases: Sequence[Lease]) -> None:
        expires_at = self._clock() + self.lease_ttl_s
        for lease in leases:
            held = self._held.get(lease.id)
            if held is not None:
                held.expires_at = expires_at
                self._held.move_to_end(lease.id)

    def forget_target(self, model: str, target: TargetKey) -> None:
        self.model(model).index.clear_target(target)

    def unsettled_since(self, model: str, target: TargetKey) -> int | None:
        return None  # only this process records: the Router tracks its own requests in flight

    def status(self) -> Mapping[str, object]:
        return {
            "store": self.name,
            "leases": len(self._held),
            "expired_leases": self._expired,
            "models": {
                name: {"indexed_entries": len(state.index), "targets": len(state.loads)}
                for name, state in self._models.items()
            },
        }
