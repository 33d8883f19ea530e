"""A version counter with a bounded log of what changed at each version, so a reader that remembers
the version it last saw can catch up on just the keys that changed since."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Generic, TypeVar

__all__ = ["ChangeLog"]

K = TypeVar("K")


class ChangeLog(Generic[K]):
    __slots__ = ("_changes", "version")

    def __init__(self, size: int = 4096) -> None:
        self.version = 0
        self._changes: deque[tuple[int, K]] = deque(maxlen=size)

    def note(self, key: K) -> None:
        self.version += 1
        self._changes.append((self.version, key))

    def note_all(self, keys: Iterable[K]) -> None:
        for key in keys:
            self.note(key)

    def changed_since(self, version: int) -> list[K] | None:
        """Keys changed after ``version`` (newest first, repeats possible); None if the log no
        longer reaches back that far."""
        if version == self.version:
            return []
        changes = self._changes
        if not changes or changes[0][0] > version + 1:
            return None
        out: list[K] = []
        for seen, key in reversed(changes):
            if seen <= version:
                break
            out.append(key)
        return out
