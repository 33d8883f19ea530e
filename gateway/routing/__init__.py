"""Routing: which server, and which DP rank of it, serves a request.

```python
router = make_router("prefix_aware", registry, redis_url=None, seed=None)
route = await router.route(RoutingRequest(model=..., endpoint="chat", messages=[...]))
# send upstream to route.worker (pin route.dp_rank unless None); add route.receipt_headers
await router.finish(route, Outcome(ok=True, prompt_tokens=..., cached_tokens=...))
```

``route`` builds the request's features (prompt size estimate and chained block hashes, no
tokenizer), a snapshot of every healthy (server, DP rank) target for the model with the leases in
flight, the server-reported loads and the predicted cached prefix, asks the policy, and reserves the
target in the state store. ``finish`` releases the lease and corrects the prefix index with what
the server reported.
"""

from __future__ import annotations

from typing import TypeVar

from gateway.routing._features import RoutingRequest
from gateway.routing._router import (
    NoHealthyWorker,
    Outcome,
    RegistryLike,
    Route,
    Router,
    RoutingError,
    UnknownModel,
    WorkerLike,
)
from gateway.state import MemoryStore, StateStore
from gateway.state.redis_store import RedisStore
from policies import DEFAULT_POLICY, get_policy

__all__ = [
    "NoHealthyWorker",
    "Outcome",
    "RegistryLike",
    "Route",
    "Router",
    "RoutingError",
    "RoutingRequest",
    "UnknownModel",
    "WorkerLike",
    "make_router",
    "make_store",
]

W = TypeVar("W", bound=WorkerLike)


def make_store(redis_url: str | None = None, *, lease_ttl_s: float = 120.0) -> StateStore:
    """The embedded store, or the Redis one shared by gateway replicas when ``redis_url`` is set."""
    if redis_url is None:
        return MemoryStore(lease_ttl_s=lease_ttl_s)
    return RedisStore(redis_url, lease_ttl_s=lease_ttl_s)


def make_router(
    policy_name: str | None,
    registry: RegistryLike[W],
    *,
    redis_url: str | None = None,
    seed: int | None = None,
    lease_ttl_s: float = 120.0,
) -> Router[W]:
    """A Router with the named policy (default prefix_aware) over the embedded or Redis store.

    Raises ``policies.UnknownPolicy`` for a policy name that is not registered.
    """
    policy = get_policy(policy_name or DEFAULT_POLICY)
    store = make_store(redis_url, lease_ttl_s=lease_ttl_s)
    return Router(registry, store, policy, seed=seed, lease_renew_interval_s=lease_ttl_s / 3)
