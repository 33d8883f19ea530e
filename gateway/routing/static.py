"""A fixed set of workers with the registry surface routing reads.

For the routing benchmark, offline trace replays and tests: no health checks, no discovery; loads
are whatever the caller sets.
"""

from __future__ import annotations

from typing import Any

import msgspec

from gateway._changes import ChangeLog
from policies.types import Role, TargetKey

__all__ = ["StaticLoad", "StaticRegistry", "StaticWorker"]


class StaticWorker(msgspec.Struct):
    url: str
    model: str = "default"
    role: Role = Role.REGULAR
    dp_size: int = 1
    page_size: int = 1
    max_total_num_tokens: int = 100_000
    healthy: bool = True
    prefill_tokens_per_s: float = 10_000.0
    decode_step_s: float = 0.02


class StaticLoad(msgspec.Struct):
    """A server-reported load, shaped like one entry of SGLang's /v1/loads."""

    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    num_waiting_uncached_tokens: int = 0
    token_usage: float = 0.0


class _ReportedLoads(dict[TargetKey, StaticLoad]):
    """The caller-set loads, logging which targets' entries change (as the live registry's polls do)."""

    def __init__(self) -> None:
        super().__init__()
        self.log: ChangeLog[TargetKey] = ChangeLog()

    def __setitem__(self, key: TargetKey, value: StaticLoad) -> None:
        super().__setitem__(key, value)
        self.log.note(key)

    def __delitem__(self, key: TargetKey) -> None:
        super().__delitem__(key)
        self.log.note(key)

    def pop(self, key: TargetKey, *default: Any) -> Any:
        self.log.note(key)
        return super().pop(key, *default)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def clear(self) -> None:
        self.log.note_all(list(self))
        super().clear()


class StaticRegistry:
    def __init__(self, workers: list[StaticWorker]) -> None:
        self.items = workers
        self.loads: dict[TargetKey, StaticLoad] = _ReportedLoads()

    @property
    def report_version(self) -> int:
        loads = self.loads
        return loads.log.version if isinstance(loads, _ReportedLoads) else -1

    def report_changes_since(self, version: int) -> list[TargetKey] | None:
        loads = self.loads
        # A caller that replaced the dict wholesale gets a full re-read every interval.
        return loads.log.changed_since(version) if isinstance(loads, _ReportedLoads) else None

    def workers(
        self, model: str | None = None, role: Role | None = None, healthy_only: bool = True
    ) -> list[StaticWorker]:
        return [
            w
            for w in self.items
            if (model is None or w.model == model)
            and (role is None or w.role == role)
            and (w.healthy or not healthy_only)
        ]

    def models(self) -> list[str]:
        return sorted({w.model for w in self.items})

    def reported_load(self, target: TargetKey) -> Any:
        return self.loads.get(target)
