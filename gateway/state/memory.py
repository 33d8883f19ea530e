"""The embedded store: one gateway process, no other moving part."""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence

from gateway.state._base import Choice, Lease, ModelState
from policies.types import TargetKey

__all__ = ["MemoryStore"]


class _Held:
    __slots__ = ("expires_at", "lease")

    def __init__(self, lease: Lease, expires_at: float) -> None:
        self.lease = lease
        self.expires_at = expires_at


class MemoryStore:
    """Leases and the prefix index in this process. Reserve is check-and-add with no await in
    between, which on one event loop is atomic."""

    name = "memory"

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
        return self.model(model)

    def _expire(self, now: float) -> None:
        held = self._held
        while held:
            first = next(iter(held.values()))
            if first.expires_at > now:
                return
            held.popitem(last=False)
            lease = first.lease
            self.model(lease.model).add_load(lease.target, -1, -lease.prefill_tokens)
            self._expired += 1

    async def reserve(
        self, model: str, choices: Sequence[Choice], *, prefill_tokens: int, blocks: Sequence[int]
    ) -> Lease:
        return self.reserve_now(model, choices, prefill_tokens=prefill_tokens, blocks=blocks)

    def reserve_now(
        self, model: str, choices: Sequence[Choice], *, prefill_tokens: int, blocks: Sequence[int]
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
        if self._held.pop(lease.id, None) is not None:
            state.add_load(lease.target, -1, -lease.prefill_tokens)
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
