from __future__ import annotations

from gateway.state import Choice, MemoryStore
from policies.types import TargetKey

A, B, C = TargetKey("http://a"), TargetKey("http://b"), TargetKey("http://c")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_reserve_takes_the_first_choice_within_its_bound() -> None:
    store = MemoryStore()
    first = await store.reserve("m", [Choice(A, 0), Choice(B, 0)], prefill_tokens=100, blocks=[1, 2])
    assert first.target == A and first.choice == 0
    # A now has one in flight: a request decided on a view where A was idle goes to B
    second = await store.reserve("m", [Choice(A, 0), Choice(B, 0)], prefill_tokens=50, blocks=[])
    assert second.target == B and second.choice == 1
    # nothing within bound: the least loaded choice (a request is never refused)
    third = await store.reserve("m", [Choice(A, 0), Choice(B, 0)], prefill_tokens=0, blocks=[])
    assert third.target == A  # a tie: the earlier choice
    fourth = await store.reserve("m", [Choice(A, 0), Choice(B, 0)], prefill_tokens=0, blocks=[])
    assert fourth.target == B
    loads = store.model("m").loads
    assert (loads[A].requests, loads[A].prefill_tokens) == (2, 100)
    assert loads[B].requests == 2
    assert store.model("m").index.match([1, 2])[0].target == A
    for lease in (first, second, third, fourth):
        await store.release(lease)
    await store.release(first)  # releasing twice changes nothing
    assert loads[A].requests == 0 and loads[B].requests == 0 and loads[A].prefill_tokens == 0


async def test_leases_lapse_unless_renewed() -> None:
    clock = Clock()
    store = MemoryStore(lease_ttl_s=10, clock=clock)
    kept = await store.reserve("m", [Choice(A, 9)], prefill_tokens=5, blocks=[])
    lost = await store.reserve("m", [Choice(B, 9)], prefill_tokens=5, blocks=[])
    clock.now += 8
    await store.renew([kept])
    clock.now += 5  # lost is 13 s old, kept renewed 5 s ago
    await store.reserve("m", [Choice(C, 9)], prefill_tokens=0, blocks=[])
    loads = store.model("m").loads
    assert loads[A].requests == 1 and loads[B].requests == 0
    assert store.status()["expired_leases"] == 1
    await store.release(lost)  # a lapsed lease's release is harmless
    assert loads[B].requests == 0


async def test_release_forgets_blocks_on_the_leased_target_only() -> None:
    store = MemoryStore()
    index = store.model("m").index
    index.record(B, [1, 2, 3])
    lease = await store.reserve("m", [Choice(A, 9)], prefill_tokens=0, blocks=[1, 2, 3])
    forgotten = store.release_now(lease, forget=[2, 3, 42])
    assert sorted(forgotten) == [2, 3]
    assert index.holds(A, 1) and not index.holds(A, 2) and index.holds(B, 3)


def test_change_log_lets_readers_catch_up() -> None:
    store = MemoryStore()
    state = store.model("m")
    start = state.version
    state.add_load(A, 1, 10)
    state.add_load(B, 1, 10)
    assert set(state.changed_since(start) or []) == {A, B}
    assert state.changed_since(state.version) == []
    for _ in range(5000):
        state.add_load(C, 1, 0)
    assert state.changed_since(start) is None  # too far behind: rebuild


async def test_prefill_tokens_stop_counting_when_due() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    lease = await store.reserve("m", [Choice(A, 9)], prefill_tokens=4000, blocks=[], prefill_s=0.5)
    held_long = await store.reserve("m", [Choice(A, 9)], prefill_tokens=100, blocks=[])
    loads = (await store.ready("m")).loads
    assert (loads[A].requests, loads[A].prefill_tokens) == (2, 4100)
    clock.now += 0.6
    loads = (await store.ready("m")).loads
    assert (loads[A].requests, loads[A].prefill_tokens) == (2, 100)  # prefilled, now decoding
    await store.release(lease)
    await store.release(held_long)
    assert (loads[A].requests, loads[A].prefill_tokens) == (0, 0)
