"""A fixed set of workers with the registry surface routing reads.

For the routing benchmark, offline trace replays and tests: no health checks, no discovery; loads
are whatever the caller sets.
"""

from __future__ import annotations

from typing import Any

import msgspec

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


class StaticRegistry:
    def __init__(self, workers: list[StaticWorker]) -> None:
        self.items = workers
        self.loads: dict[TargetKey, StaticLoad] = {}

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
