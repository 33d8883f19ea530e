"""Bootstrap rooms: random 63-bit ids naming one KV transfer, unique among those in flight.

Rooms come from the operating system's randomness, never from the routing seed: two gateway
replicas started with the same ``--seed`` must not hand out the same rooms to a shared prefill
server. A room is also chosen congruent to the prefill DP rank modulo the prefill's dp_size, so a
prefill server that balances by ``follow_bootstrap_room`` (SGLang's default on prefill) lands the
request on the rank routing chose even where the explicit rank pin is not understood.
"""

from __future__ import annotations

import random

__all__ = ["RoomAllocator"]

_ROOM_BITS = 63


class RoomAllocator:
    """Hands out rooms not currently in flight in this process."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.SystemRandom()
        self._live: set[int] = set()

    def allocate(self, count: int, *, dp_size: int = 1, dp_rank: int | None = None) -> tuple[int, ...]:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        modulus = max(dp_size, 1)
        rooms: list[int] = []
        while len(rooms) < count:
            room = self._rng.getrandbits(_ROOM_BITS)
            if dp_rank is not None and modulus > 1:
                room = room - room % modulus + dp_rank % modulus
                if room >= 1 << _ROOM_BITS:
                    continue
            if room in self._live:
                continue
            self._live.add(room)
            rooms.append(room)
        return tuple(rooms)

    def release(self, rooms: tuple[int, ...]) -> None:
        for room in rooms:
            self._live.discard(room)

    def in_flight(self) -> int:
        return len(self._live)
