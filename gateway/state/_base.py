"""The state-store seam shared by the embedded and the Redis implementations."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import msgspec

from gateway._changes import ChangeLog
from policies.prefix_index import PrefixIndex
from policies.types import TargetKey

__all__ = ["Choice", "Lease", "ModelState", "StateStore", "TargetLoad"]

# How many load changes a model remembers so a reader can catch up incrementally.
_CHANGE_LOG = 4096


class TargetLoad(msgspec.Struct):
    """In-flight work the gateways hold leases for on one target."""

    requests: int = 0
    prefill_tokens: int = 0


class Choice(msgspec.Struct, frozen=True):
    """A target a request may be reserved on, if it has at most ``max_inflight`` requests in flight
    at reservation time (what the policy saw, so a replica that got there first is noticed)."""

    target: TargetKey
    max_inflight: int


class Lease(msgspec.Struct):
    """A reservation of one request's work on a target; expires unless renewed."""

    id: str
    model: str
    target: TargetKey
    prefill_tokens: int
    # Index (into the choices given) of the target reserved; > 0 when a better one was taken.
    choice: int = 0
    # Made while the shared store was unreachable: known only to this gateway.
    local_only: bool = False


class ModelState:
    """One model's local state: the prefix index, in-flight loads, and a log of load changes."""

    __slots__ = ("_changes", "_remote_records", "index", "loads")

    def __init__(self, default_budget_blocks: int) -> None:
        self.index = PrefixIndex(default_budget_blocks=default_budget_blocks)
        self.loads: dict[TargetKey, TargetLoad] = {}
        self._changes: ChangeLog[TargetKey] = ChangeLog(_CHANGE_LOG)
        # Per target: (when, index stamp) of blocks other gateways recorded there, oldest first.
        self._remote_records: dict[TargetKey, deque[tuple[float, int]]] = {}

    def note_remote_record(self, target: TargetKey, stamp: int, at: float, window_s: float) -> None:
        """Another gateway routed a request there: the blocks recorded at ``stamp`` may not be
        prefilled yet."""
        records = self._remote_records.get(target)
        if records is None:
            records = self._remote_records[target] = deque()
        records.append((at, stamp))
        while records[0][0] < at - window_s:
            records.popleft()

    def oldest_remote_record(self, target: TargetKey, now: float, window_s: float) -> int | None:
        """The stamp of the oldest of those recorded within ``window_s`` before ``now``, if any."""
        records = self._remote_records.get(target)
        if not records:
            return None
        while records and records[0][0] < now - window_s:
            records.popleft()
        return records[0][1] if records else None

    @property
    def version(self) -> int:
        return self._changes.version

    def touch(self, target: TargetKey) -> None:
        self._changes.note(target)

    def add_load(self, target: TargetKey, requests: int, prefill_tokens: int) -> None:
        load = self.loads.get(target)
        if load is None:
            load = self.loads[target] = TargetLoad()
        load.requests = max(load.requests + requests, 0)
        load.prefill_tokens = max(load.prefill_tokens + prefill_tokens, 0)
        self.touch(target)

    def set_load(self, target: TargetKey, requests: int, prefill_tokens: int) -> None:
        load = self.loads.get(target)
        if load is not None and load.requests == requests and load.prefill_tokens == prefill_tokens:
            return
        self.loads[target] = TargetLoad(requests, prefill_tokens)
        self.touch(target)

    def first_within_bound(self, choices: Sequence[Choice]) -> int:
        """Index of the first choice within its in-flight bound, else of the least loaded choice."""
        counts: list[tuple[int, int]] = []
        for position, choice in enumerate(choices):
            load = self.loads.get(choice.target)
            requests = load.requests if load is not None else 0
            if requests <= choice.max_inflight:
                return position
            counts.append((requests, position))
        return min(counts)[1]

    def changed_since(self, version: int) -> list[TargetKey] | None:
        """Targets whose load changed after ``version``; None if the log no longer reaches back."""
        return self._changes.changed_since(version)


class StateStore(Protocol):
    """Routing state: the prefix index (a local mirror, read synchronously on the hot path) and
    in-flight leases (reserved and released asynchronously, atomically across gateway replicas)."""

    name: str
    # True when other gateway processes reserve on the same targets (so a reservation can find its
    # first choice taken and needs fallbacks); False for a store only this process writes.
    shared: bool

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    def model(self, model: str) -> ModelState:
        """The local state for ``model`` (created empty on first use)."""
        ...

    async def ready(self, model: str) -> ModelState:
        """``model``'s local state after any one-time warm-up (a replica's first look at the shared
        index); then as cheap as ``model``."""
        ...

    async def reserve(
        self,
        model: str,
        choices: Sequence[Choice],
        *,
        prefill_tokens: int,
        blocks: Sequence[int],
        prefill_s: float | None = None,
    ) -> Lease:
        """Reserve the first choice still within its in-flight bound (else the least loaded choice: a
        request is never refused here) and record ``blocks`` as cached on the target reserved.

        ``prefill_tokens`` count as queued prefill on the target for ``prefill_s`` seconds (the
        expected time to first token, with margin), or until release when None; the request itself
        counts until release."""
        ...

    async def release(
        self, lease: Lease, *, forget: Iterable[int] = (), forget_through_stamp: int | None = None
    ) -> None:
        """End ``lease``; and, for the prefix index, forget blocks the target turned out not to hold:
        ``forget`` by hash, and every entry of the target not used since ``forget_through_stamp``."""
        ...

    async def renew(self, leases: Sequence[Lease]) -> None:
        """Extend the expiry of ``leases`` (requests still streaming)."""
        ...

    def forget_target(self, model: str, target: TargetKey) -> None:
        """The target flushed its cache or restarted: it holds nothing."""
        ...

    def unsettled_since(self, model: str, target: TargetKey) -> int | None:
        """The oldest index stamp of blocks *another* gateway recorded on ``target`` recently enough
        that its request may still be prefilling them (None if none; always None for a store only
        this process writes). A shorter hit than predicted on those blocks is no evidence that the
        server evicted them: SGLang schedules two requests of one new prefix in one batch without
        a hit for either."""
        ...

    def status(self) -> Mapping[str, object]:
        """Health and counters for the admin API."""
        ...
