"""Routing state: the prefix index and in-flight leases, embedded (default) or shared via Redis."""

from gateway.state._base import Choice, Lease, ModelState, StateStore, TargetLoad
from gateway.state.memory import MemoryStore

__all__ = ["Choice", "Lease", "MemoryStore", "ModelState", "StateStore", "TargetLoad"]
