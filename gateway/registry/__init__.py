"""The worker registry: which upstream servers exist, what they are, whether they are healthy, how loaded.

registry = WorkerRegistry([WorkerSpec("http://127.0.0.1:30000")], transport,
                          health_interval_s=5, fail_threshold=3, recover_threshold=2, load_interval_s=1)
await registry.start()
registry.workers(model="deepseek-ai/DeepSeek-V3", role=Role.REGULAR)   # healthy ones
registry.reported_load(TargetKey(worker.url, 3))                        # ReportedLoad | None
await registry.stop()
"""

from __future__ import annotations

from gateway.registry._discovery import DiscoveryError, discover
from gateway.registry._health import HealthTracker
from gateway.registry._models import (
    DEFAULT_DECODE_STEP_S,
    DEFAULT_NODE_PREFILL_TOKENS_PER_S,
    ReportedLoad,
    Worker,
    WorkerSpec,
    normalise_url,
)
from gateway.registry._registry import WorkerRegistry
from policies.types import Role, TargetKey

__all__ = [
    "DEFAULT_DECODE_STEP_S",
    "DEFAULT_NODE_PREFILL_TOKENS_PER_S",
    "DiscoveryError",
    "HealthTracker",
    "ReportedLoad",
    "Role",
    "TargetKey",
    "Worker",
    "WorkerRegistry",
    "WorkerSpec",
    "discover",
    "normalise_url",
]
