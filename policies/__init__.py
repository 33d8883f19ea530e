"""Routing decisions as pure code: ``decide(features, snapshot, rng) -> Decision``."""

from policies.registry import DEFAULT_POLICY, UnknownPolicy, get_policy, policy_names

__all__ = ["DEFAULT_POLICY", "UnknownPolicy", "get_policy", "policy_names"]
