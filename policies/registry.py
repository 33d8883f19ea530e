"""Policies by name. Each name maps to a factory so every Router gets its own policy instance."""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType

from policies.basic import LeastLoad, RandomChoice, RoundRobin
from policies.decode_load import DecodeLoad
from policies.prefix_aware import PrefixAware
from policies.types import Policy

__all__ = ["DEFAULT_POLICY", "UnknownPolicy", "get_policy", "policy_names"]

DEFAULT_POLICY = "prefix_aware"

_FACTORIES: MappingProxyType[str, Callable[[], Policy]] = MappingProxyType(
    {
        "prefix_aware": PrefixAware,
        "round_robin": RoundRobin,
        "random": RandomChoice,
        "least_load": LeastLoad,
        # Chooses PD decode targets; on regular servers it ignores prefixes (a load-only baseline).
        "decode_load": DecodeLoad,
    }
)


class UnknownPolicy(ValueError):
    """The name given is not a registered policy."""


def policy_names() -> list[str]:
    return sorted(_FACTORIES)


def get_policy(name: str) -> Policy:
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise UnknownPolicy(f"unknown policy {name!r}; choose one of {', '.join(policy_names())}") from None
    return factory()
