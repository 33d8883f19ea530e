"""The shared store: any number of gateway replicas share leases and the prefix index via Redis.

Every replica keeps a full local mirror (the prefix index and in-flight loads per target), so a
routing decision reads only local memory. Redis is written and read through one Lua script, at
most once per request phase:

- ``reserve`` (1 round trip): expire lapsed leases, take the first of the policy's ranked choices
  whose in-flight count is still within what the policy saw (check-and-add, so two replicas never
  both pile onto one "idle" target), add the lease, publish the request's blocks on the target to
  the model's event stream, and return the other replicas' index updates since last time plus
  fresh loads.
- ``release`` (1 round trip): end the lease, publish index corrections, return updates and loads.

So a request costs exactly 2 round trips. Off the request path, two batched calls keep the mirror
fresh: lease renewal for long streams (one call per renewal interval for all of a replica's open
leases) and, while the replica is routing, a pull of the other replicas' updates (``sync``) whenever
no call has been made for ``sync_interval_s``. Without it a replica would decide on a mirror as old
as its own last request: at a few requests per second per replica it sent the second request of a
shared prefix elsewhere, because the replica that placed the first had not been heard from yet.

If Redis is unreachable or slower than ``op_timeout_s``, the call is abandoned and the replica keeps
routing on its local view: reservations become local-only leases, index updates queue in a bounded
outbox, and releases of shared leases queue too. A background resync (at most every
``retry_interval_s``) flushes the queues, reloads all loads and catches up on the event stream;
only then is Redis used on the request path again. No request ever fails because of Redis.

Keys carry the hash tag ``{cachet:<model>}`` so one model's keys live in one Redis Cluster slot.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import time
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.state._base import Choice, Lease, ModelState
from gateway.state._redis_script import SCRIPT
from policies.types import TargetKey

__all__ = ["RedisStore", "model_keys"]

_OUTBOX = 10_000
_PENDING_RELEASES = 100_000


def model_keys(model: str, prefix: str = "cachet") -> list[str]:
    tag = "{" + f"{prefix}:{model}" + "}"
    return [f"{tag}:load", f"{tag}:leases", f"{tag}:lease", f"{tag}:events", f"{tag}:prefill"]


def _pack(hashes: Sequence[int]) -> bytes:
    packed = array("Q", hashes)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def _unpack(blob: bytes) -> array[int]:
    hashes = array("Q")
    hashes.frombytes(blob)
    if sys.byteorder == "big":
        hashes.byteswap()
    return hashes


def _target(label: str) -> TargetKey:
    worker, _, rank = label.rpartition("@")
    return TargetKey(worker, int(rank))


def _stream_position(entry_id: str) -> tuple[int, int]:
    if not entry_id:
        return (-1, -1)
    ms, _, seq = entry_id.partition("-")
    return (int(ms), int(seq or 0))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Local:
    """A lease known only to this replica (made while Redis was unreachable)."""

    __slots__ = ("expires_at", "lease", "prefill_due", "prefill_left")

    def __init__(self, lease: Lease, expires_at: float, prefill_due: float | None) -> None:
        self.lease = lease
        self.expires_at = expires_at
        self.prefill_due = prefill_due
        self.prefill_left = lease.prefill_tokens


class _Shared:
    """Per-model replica state beyond the mirror: stream position, outbox, local-only load."""

    __slots__ = (
        "calls_in_flight",
        "last_call_at",
        "last_event_id",
        "last_used_at",
        "loads_synced_at",
        "local_load",
        "outbox",
        "pending_releases",
    )

    def __init__(self) -> None:
        self.last_event_id = ""
        self.loads_synced_at = float("-inf")
        # When a call last started (its reply brings the mirror up to that moment), how many are
        # still out, and when this replica last routed a request of the model.
        self.last_call_at = float("-inf")
        self.calls_in_flight = 0
        self.last_used_at = float("-inf")
        self.outbox: deque[tuple[bytes, str, bytes]] = deque(maxlen=_OUTBOX)
        self.pending_releases: deque[str] = deque(maxlen=_PENDING_RELEASES)
        # Load this replica counts on top of Redis's: local-only leases, reservations in flight.
        self.local_load: dict[TargetKey, list[int]] = {}


class RedisStore:
    name = "redis"
    shared = True

    def __init__(
        self,
        url: str,
        *,
        lease_ttl_s: float = 120.0,
        op_timeout_s: float = 0.1,
        retry_interval_s: float = 1.0,
        loads_sync_interval_s: float = 0.25,
        sync_interval_s: float = 0.02,
        sync_idle_after_s: float = 2.0,
        sync_idle_interval_s: float = 1.0,
        remote_settle_s: float = 5.0,
        max_events_per_call: int = 2000,
        stream_maxlen: int = 20_000,
        bootstrap_events: int = 20_000,
        default_budget_blocks: int = 65_536,
        key_prefix: str = "cachet",
        client: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.lease_ttl_s = lease_ttl_s
        self.op_timeout_s = op_timeout_s
        self.retry_interval_s = retry_interval_s
        self.loads_sync_interval_s = loads_sync_interval_s
        # Pull others' updates when the mirror is this old, for this long after the last request
        # routed here, then only at the idle interval (an idle replica costs Redis one small call
        # a second); 0 turns the pull off.
        self.sync_interval_s = sync_interval_s
        self.sync_idle_after_s = sync_idle_after_s
        self.sync_idle_interval_s = sync_idle_interval_s
        # How long blocks another replica recorded count as possibly still being prefilled.
        self.remote_settle_s = remote_settle_s
        self.max_events_per_call = max_events_per_call
        self.stream_maxlen = stream_maxlen
        self.bootstrap_events = bootstrap_events
        self._default_budget = default_budget_blocks
        self._prefix = key_prefix
        self._clock = clock
        self.origin = os.urandom(8).hex()
        self._client: Any = client
        self._owns_client = client is None
        self._script: Any = None
        self._models: dict[str, ModelState] = {}
        self._shared: dict[str, _Shared] = {}
        self._keys: dict[str, list[str]] = {}
        self._local: OrderedDict[str, _Local] = OrderedDict()
        self._ids = itertools.count(1)
        self._up = False
        self._retry_at = float("-inf")
        self._resync_task: asyncio.Task[None] | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self.last_error = ""
        self.counters: dict[str, int] = {
            "calls": 0,
            "failures": 0,
            "local_reservations": 0,
            "resyncs": 0,
            "events_applied": 0,
            "first_choice_taken": 0,
            "background_syncs": 0,
        }

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._client is None:
            self._client = aioredis.Redis.from_url(
                self.url,
                socket_timeout=self.op_timeout_s,
                socket_connect_timeout=self.op_timeout_s,
                health_check_interval=0,
                retry_on_timeout=False,
            )
        self._script = self._client.register_script(SCRIPT)
        try:
            async with asyncio.timeout(self.op_timeout_s * 5):
                await self._client.ping()
            self._up = True
        except (RedisError, OSError, TimeoutError):
            self._mark_down()
        if self.sync_interval_s > 0 and self._sync_task is None:
            self._sync_task = asyncio.get_running_loop().create_task(self._sync_loop())

    async def aclose(self) -> None:
        tasks = [task for task in (self._sync_task, self._resync_task) if task is not None]
        self._sync_task = self._resync_task = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None and self._owns_client:
            await self._client.aclose()
        self._client = None

    @property
    def connected(self) -> bool:
        return self._up

    def _mark_down(self) -> None:
        if self._up:
            self.counters["failures"] += 1
        self._up = False
        self._retry_at = self._clock() + self.retry_interval_s

    def _usable(self) -> bool:
        """True if Redis may be used on the request path now; else maybe start a resync."""
        if self._up:
            return True
        if self._clock() >= self._retry_at and (self._resync_task is None or self._resync_task.done()):
            self._retry_at = self._clock() + self.retry_interval_s
            self._resync_task = asyncio.get_running_loop().create_task(self._resync())
        return False

    # -- local state -----------------------------------------------------------------------------

    def model(self, model: str) -> ModelState:
        state = self._models.get(model)
        if state is None:
            state = self._models[model] = ModelState(self._default_budget)
            self._shared[model] = _Shared()
            self._keys[model] = model_keys(model, self._prefix)
        return state

    async def ready(self, model: str) -> ModelState:
        state = self.model(model)
        if not self._shared[model].last_event_id and self._usable():
            # First request for this model here: learn what other replicas indexed (once).
            await self._bootstrap(model)
        return state

    async def _sync_loop(self) -> None:
        """Pull other replicas' updates into the mirror whenever it is ``sync_interval_s`` old while
        this replica routes (requests' own calls usually keep it fresher, and then this costs none);
        once idle, only every ``sync_idle_interval_s``, so the first request after a lull decides on
        a mirror at most that old."""
        interval = self.sync_interval_s
        while True:
            await asyncio.sleep(interval)
            if not self._up:
                continue  # the resync brings the mirror back when Redis returns
            now = self._clock()
            for model, shared in list(self._shared.items()):
                idle = now - shared.last_used_at > self.sync_idle_after_s
                due = max(interval, self.sync_idle_interval_s) if idle else interval
                if shared.calls_in_flight or now - shared.last_call_at < due or not shared.last_event_id:
                    continue
                if not self._up:
                    break
                self.counters["background_syncs"] += 1
                try:
                    await self._call(model, "sync", [], want_all=self._want_all(model))
                except Exception as exc:  # a bad reply must not end the pulls
                    self.last_error = f"sync: {type(exc).__name__}: {exc}"

    def _shared_of(self, model: str) -> _Shared:
        self.model(model)
        return self._shared[model]

    def _expire_local(self) -> None:
        if not self._local:
            return
        now = self._clock()
        for entry in self._local.values():  # only while Redis is away: few
            if entry.prefill_left and entry.prefill_due is not None and entry.prefill_due <= now:
                self._adjust_local(entry.lease, 0, -entry.prefill_left)
                entry.prefill_left = 0
        while self._local:
            first = next(iter(self._local.values()))
            if first.expires_at > now:
                return
            self._local.popitem(last=False)
            self._adjust_local(first.lease, -1, -first.prefill_left)

    def _adjust_local(self, lease: Lease, requests: int, tokens: int) -> None:
        self.model(lease.model).add_load(lease.target, requests, tokens)
        local = self._shared_of(lease.model).local_load.get(lease.target)
        if local is not None:
            local[0] += requests
            local[1] += tokens

    # -- the script ------------------------------------------------------------------------------

    async def _call(self, model: str, op: str, args: list[Any], *, want_all: bool) -> list[Any] | None:
        """Run the script for ``model``; None if Redis failed (and the store is now down)."""
        shared = self._shared_of(model)
        outbox = shared.outbox
        shared.outbox = deque(maxlen=_OUTBOX)
        argv: list[Any] = [
            op,
            self.origin,
            shared.last_event_id,
            "1" if want_all else "0",
            self.max_events_per_call,
            self.stream_maxlen,
            *args,
            len(outbox),
        ]
        for kind, label, blob in outbox:
            argv.extend((kind, label, blob))
        self.counters["calls"] += 1
        shared.last_call_at = self._clock()
        shared.calls_in_flight += 1
        try:
            async with asyncio.timeout(self.op_timeout_s):
                reply: list[Any] = await self._script(keys=self._keys[model], args=argv)
        except (RedisError, OSError, TimeoutError) as exc:
            self.last_error = f"{op}: {type(exc).__name__}: {exc}"
            # Not known to be published: queue it again, ahead of anything added meanwhile.
            outbox.extend(shared.outbox)
            shared.outbox = outbox
            self._mark_down()
            return None
        finally:
            shared.calls_in_flight -= 1
        self._absorb(model, reply, want_all=want_all)
        return reply

    def _absorb(self, model: str, reply: list[Any], *, want_all: bool) -> None:
        state = self.model(model)
        shared = self._shared[model]
        last = _text(reply[2])
        # Concurrent calls may answer out of order; never move the stream position backwards.
        if _stream_position(last) > _stream_position(shared.last_event_id):
            shared.last_event_id = last
        events = reply[3]
        index = state.index
        now = self._clock()
        for position in range(0, len(events), 3):
            kind, label, blob = events[position], _text(events[position + 1]), events[position + 2]
            target = _target(label)
            hashes = _unpack(blob)
            if kind == b"r":
                stamp = index.record(target, hashes)
                state.note_remote_record(target, stamp, now, self.remote_settle_s)
            else:
                index.drop(target, hashes)
        self.counters["events_applied"] += len(events) // 3
        flat = reply[4]
        counts: dict[TargetKey, list[int]] = {}
        for position in range(0, len(flat), 2):
            field = _text(flat[position])
            value = int(flat[position + 1])
            if field.endswith("|t"):
                counts.setdefault(_target(field[:-2]), [0, 0])[1] = value
            else:
                counts.setdefault(_target(field), [0, 0])[0] = value
        if want_all:
            shared.loads_synced_at = self._clock()
            for target in state.loads:
                counts.setdefault(target, [0, 0])
        for target, (remote_requests, remote_tokens) in counts.items():
            local = shared.local_load.get(target)
            if local is None:
                state.set_load(target, remote_requests, remote_tokens)
            else:
                state.set_load(target, remote_requests + local[0], remote_tokens + local[1])

    def _want_all(self, model: str) -> bool:
        return self._clock() - self._shared_of(model).loads_synced_at >= self.loads_sync_interval_s

    # -- StateStore ------------------------------------------------------------------------------

    async def reserve(
        self,
        model: str,
        choices: Sequence[Choice],
        *,
        prefill_tokens: int,
        blocks: Sequence[int],
        prefill_s: float | None = None,
    ) -> Lease:
        if not choices:
            raise ValueError("reserve needs at least one choice")
        state = await self.ready(model)
        self._shared[model].last_used_at = self._clock()
        self._expire_local()
        lease_id = f"{self.origin}:{next(self._ids)}"
        if self._usable():
            args: list[Any] = [
                lease_id,
                int(self.lease_ttl_s * 1000),
                prefill_tokens,
                max(int(prefill_s * 1000), 1) if prefill_s is not None else 0,
                _pack(blocks) if blocks else b"",
                len(choices),
            ]
            for choice in choices:
                args.extend((choice.target.label(), choice.max_inflight))
            # Count the request on its first choice while Redis answers, so decisions this replica
            # makes meanwhile (concurrent requests) see it and spread.
            first = choices[0].target
            adjustment = self._shared[model].local_load.setdefault(first, [0, 0])
            adjustment[0] += 1
            adjustment[1] += prefill_tokens
            state.add_load(first, 1, prefill_tokens)
            try:
                reply = await self._call(model, "reserve", args, want_all=self._want_all(model))
            finally:
                adjustment[0] -= 1
                adjustment[1] -= prefill_tokens
                state.add_load(first, -1, -prefill_tokens)
            if reply is not None:
                chosen = int(reply[0]) - 1
                if chosen > 0:
                    self.counters["first_choice_taken"] += 1
                target = choices[chosen].target
                if blocks:
                    state.index.record(target, blocks)
                return Lease(lease_id, model, target, prefill_tokens, choice=chosen)
        return self._reserve_local(
            model, lease_id, choices, prefill_tokens=prefill_tokens, blocks=blocks, prefill_s=prefill_s
        )

    def _reserve_local(
        self,
        model: str,
        lease_id: str,
        choices: Sequence[Choice],
        *,
        prefill_tokens: int,
        blocks: Sequence[int],
        prefill_s: float | None,
    ) -> Lease:
        state = self.model(model)
        shared = self._shared[model]
        chosen = state.first_within_bound(choices)
        target = choices[chosen].target
        lease = Lease(lease_id, model, target, prefill_tokens, choice=chosen, local_only=True)
        now = self._clock()
        self._local[lease_id] = _Local(
            lease, now + self.lease_ttl_s, None if prefill_s is None else now + prefill_s
        )
        local = shared.local_load.setdefault(target, [0, 0])
        local[0] += 1
        local[1] += prefill_tokens
        state.add_load(target, 1, prefill_tokens)
        if blocks:
            state.index.record(target, blocks)
            shared.outbox.append((b"r", target.label(), _pack(blocks)))
        self.counters["local_reservations"] += 1
        return lease

    async def release(
        self, lease: Lease, *, forget: Iterable[int] = (), forget_through_stamp: int | None = None
    ) -> None:
        state = self.model(lease.model)
        shared = self._shared[lease.model]
        forgotten: list[int] = []
        if forget_through_stamp is not None:
            forgotten.extend(state.index.evict_through(lease.target, forget_through_stamp))
        held = [block for block in forget if state.index.holds(lease.target, block)]
        if held:
            state.index.drop(lease.target, held)
            forgotten.extend(held)
        if forgotten:
            shared.outbox.append((b"f", lease.target.label(), _pack(forgotten)))
        if lease.local_only:
            entry = self._local.pop(lease.id, None)
            if entry is not None:
                self._adjust_local(lease, -1, -entry.prefill_left)
            if self._usable() and shared.outbox:
                await self._call(lease.model, "sync", [], want_all=self._want_all(lease.model))
            return
        if self._usable():
            ids = [lease.id, *shared.pending_releases]
            want_all = self._want_all(lease.model)
            reply = await self._call(lease.model, "release", [len(ids), *ids], want_all=want_all)
            if reply is not None:
                for _ in range(len(ids) - 1):
                    shared.pending_releases.popleft()
                return
        # Redis is away: count the request as done here, and end the shared lease when it is back.
        state.add_load(lease.target, -1, -lease.prefill_tokens)
        shared.pending_releases.append(lease.id)

    async def renew(self, leases: Sequence[Lease]) -> None:
        now = self._clock()
        by_model: dict[str, list[str]] = {}
        for lease in leases:
            local = self._local.get(lease.id)
            if local is not None:
                local.expires_at = now + self.lease_ttl_s
                self._local.move_to_end(lease.id)
            elif not lease.local_only:
                by_model.setdefault(lease.model, []).append(lease.id)
        if not self._usable():
            return
        ttl_ms = int(self.lease_ttl_s * 1000)
        for model, ids in by_model.items():
            await self._call(model, "renew", [ttl_ms, len(ids), *ids], want_all=False)

    def unsettled_since(self, model: str, target: TargetKey) -> int | None:
        return self.model(model).oldest_remote_record(target, self._clock(), self.remote_settle_s)

    def forget_target(self, model: str, target: TargetKey) -> None:
        index = self.model(model).index
        blocks = index.held_blocks(target)
        if blocks:
            index.clear_target(target)
            self._shared[model].outbox.append((b"f", target.label(), _pack(blocks)))

    # -- resync ----------------------------------------------------------------------------------

    async def _resync(self) -> None:
        """Bring this replica back in step after Redis was away (or at a cold start)."""
        try:
            async with asyncio.timeout(self.op_timeout_s * 10):
                await self._client.ping()
        except (RedisError, OSError, TimeoutError):
            self._retry_at = self._clock() + self.retry_interval_s
            return
        for model in list(self._models):
            shared = self._shared[model]
            if not shared.last_event_id and not await self._bootstrap(model):
                return
            ids = list(shared.pending_releases)
            self._up = True  # let _call run; it marks us down again on failure
            reply = await self._call(model, "release", [len(ids), *ids], want_all=True)
            if reply is None:
                return
            for _ in ids:
                shared.pending_releases.popleft()
        self._up = True
        self.counters["resyncs"] += 1

    async def _bootstrap(self, model: str) -> bool:
        """Rebuild ``model``'s index from the stream's recent history (a replica's cold start)."""
        state = self.model(model)
        try:
            async with asyncio.timeout(max(self.op_timeout_s * 20, 2.0)):
                entries = await self._client.xrevrange(self._keys[model][3], count=self.bootstrap_events)
        except (RedisError, OSError, TimeoutError):
            self._mark_down()
            return False
        for _entry_id, fields in reversed(entries):
            target = _target(_text(fields[b"t"]))
            hashes = _unpack(fields[b"h"])
            if fields[b"k"] == b"r":
                state.index.record(target, hashes)
            else:
                state.index.drop(target, hashes)
        self._shared[model].last_event_id = _text(entries[0][0]) if entries else "0-0"
        return True

    def status(self) -> Mapping[str, object]:
        return {
            "store": self.name,
            "redis_connected": self._up,
            "last_error": self.last_error,
            "origin": self.origin,
            "local_only_leases": len(self._local),
            "counters": dict(self.counters),
            "models": {
                name: {
                    "indexed_entries": len(state.index),
                    "targets": len(state.loads),
                    "outbox": len(self._shared[name].outbox),
                    "pending_releases": len(self._shared[name].pending_releases),
                }
                for name, state in self._models.items()
            },
        }
