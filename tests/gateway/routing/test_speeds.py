"""The Router learns each worker's prefill speed from the TTFTs it delivers, and routes on it.

Virtual time: a fake clock shared by the Router and its store; each simulated worker prefills at a
fixed true speed, so a TTFT is ``overhead + uncached / speed`` (plus whatever the test adds).
"""

from __future__ import annotations

import itertools

import pytest

from gateway.registry import DEFAULT_NODE_PREFILL_TOKENS_PER_S, ReportedLoad
from gateway.routing import Outcome, Route, Router, RoutingRequest
from gateway.routing.static import StaticRegistry, StaticWorker
from gateway.state import MemoryStore
from policies import get_policy
from policies.types import TargetKey

SEED = DEFAULT_NODE_PREFILL_TOKENS_PER_S
# The simulator's engine model, per rank: h200-tp8 and h20-tp16 prefill a full 8,192-token chunk at
# these speeds (backends.sim.engine ServerEngine.nominal_prefill_tokens_per_s).
FAST, SLOW = 35_200.0, 12_170.0
OVERHEAD_S = 0.002
PROMPT = 4000
_ids = itertools.count()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def miss(prompt: int = PROMPT) -> RoutingRequest:
    """A prompt no server has seen (token ids, so its length is exact)."""
    base = next(_ids) * 1_000_000
    return RoutingRequest(model="m", endpoint="generate", input_ids=list(range(base, base + prompt)))


def cluster(policy: str, *, learn: bool = True) -> tuple[Router[StaticWorker], StaticRegistry, Clock]:
    registry = StaticRegistry(
        [
            StaticWorker("http://fast", model="m", prefill_tokens_per_s=SEED),
            StaticWorker("http://slow", model="m", prefill_tokens_per_s=SEED),
        ]
    )
    clock = Clock()
    store = MemoryStore(clock=clock)
    router = Router(registry, store, get_policy(policy), seed=5, clock=clock, learn_speeds=learn)
    return router, registry, clock


TRUE = {"http://fast": FAST, "http://slow": SLOW}


def ttft_of(route: Route[StaticWorker], uncached: int = PROMPT) -> float:
    return OVERHEAD_S + uncached / TRUE[route.worker.url]


async def serve(
    router: Router[StaticWorker], clock: Clock, prompt: int = PROMPT, slowdown: float = 1.0
) -> Route[StaticWorker]:
    """One request start to finish, nothing else in flight; then time passes (views rebuild)."""
    route = await router.route(miss(prompt))
    ttft = ttft_of(route, prompt) * slowdown
    clock.now += ttft
    await router.finish(
        route,
        Outcome(ok=True, prompt_tokens=prompt, cached_tokens=0, completion_tokens=8, ttft_s=ttft),
    )
    clock.now += 0.5
    return route


def learned(router: Router[StaticWorker], url: str) -> float:
    return float(router.speeds()[f"{url}@0"]["prefill_tokens_per_s"])


async def test_converges_on_a_fast_and_a_slow_target_from_the_same_seed() -> None:
    router, _, clock = cluster("round_robin")  # round robin: both get samples whatever they learn
    for _ in range(60):
        await serve(router, clock)
    await serve(router, clock)  # a rebuild after the last sample
    # The 2 ms of overhead per request is the only error: within 3 %.
    assert learned(router, "http://fast") == pytest.approx(FAST, rel=0.03)
    assert learned(router, "http://slow") == pytest.approx(SLOW, rel=0.03)
    status = router.status()["prefill_speed_learning"]
    assert status["workers"]["http://fast"]["samples"] >= 30
    assert status["workers"]["http://slow"]["seed_tokens_per_s"] == SEED


async def test_prefix_aware_sends_misses_to_the_faster_target_once_learned() -> None:
    router, _, clock = cluster("prefix_aware")
    placed = [(await serve(router, clock)).worker.url for _ in range(80)]
    # Both looked equal at first: the slow one had to be tried until it looked slower.
    assert "http://slow" in placed[:20]
    assert placed[-40:].count("http://fast") == 40
    assert learned(router, "http://fast") == pytest.approx(FAST, rel=0.03)
    # The slow one is tried only until it looks slower than the fast one; it is measured further
    # whenever it gets traffic again (the fast one busy), which is when its speed matters.
    assert SLOW < learned(router, "http://slow") < learned(router, "http://fast")


async def test_without_learning_the_seeds_stay() -> None:
    router, _, clock = cluster("round_robin", learn=False)
    for _ in range(10):
        await serve(router, clock)
    assert learned(router, "http://fast") == learned(router, "http://slow") == SEED
    assert router.status()["prefill_speed_learning"]["workers"] == {}


async def test_one_outlier_moves_the_speed_by_at_most_15_percent_and_is_forgotten() -> None:
    router, _, clock = cluster("round_robin")
    for _ in range(60):
        await serve(router, clock)
    before = router.status()["prefill_speed_learning"]["workers"]["http://fast"]["prefill_tokens_per_s"]
    while (await serve(router, clock, slowdown=20.0)).worker.url != "http://fast":
        pass  # the slow worker's 20x sample is an outlier too; the fast one's is checked
    after = router.status()["prefill_speed_learning"]["workers"]["http://fast"]["prefill_tokens_per_s"]
    assert after < before
    assert after >= before / 2**0.2 - 1
    for _ in range(30):
        await serve(router, clock)
    assert learned(router, "http://fast") == pytest.approx(FAST, rel=0.03)


def one_server() -> tuple[Router[StaticWorker], Clock]:
    registry = StaticRegistry([StaticWorker("http://only", model="m", prefill_tokens_per_s=SEED)])
    clock = Clock()
    router = Router(registry, MemoryStore(clock=clock), get_policy("prefix_aware"), seed=1, clock=clock)
    return router, clock


async def test_a_burst_teaches_its_batch_and_its_first_requests_nothing() -> None:
    router, clock = one_server()
    for _ in range(30):
        # Two misses routed 5 ms apart: SGLang prefills them in one batch; both TTFTs are the batch's.
        first = await router.route(miss())
        clock.now += 0.005
        second = await router.route(miss())
        both = 2 * PROMPT / FAST
        clock.now += both
        await router.finish(first, Outcome(ok=True, prompt_tokens=PROMPT, cached_tokens=0, ttft_s=both))
        await router.finish(second, Outcome(ok=True, prompt_tokens=PROMPT, cached_tokens=0, ttft_s=both))
        clock.now += 0.5
    status = router.status()["prefill_speed_learning"]
    # The first of each pair: another request came before its prefill began (its TTFT reads as
    # half the speed). The second: the 4,000 tokens queued ahead are the first's, in its batch.
    assert status["skipped"]["joined"] == 30
    assert status["workers"]["http://only"]["samples"] == 30
    # The first counts as running for the second (as in the cost model's estimate, which adds half
    # a decode step for it): the speed that makes the model predict the TTFT seen.
    step = router.speeds()["http://only@0"]["decode_step_s"]
    expected = 2 * PROMPT / (2 * PROMPT / FAST - 0.5 * step)
    assert status["workers"]["http://only"]["prefill_tokens_per_s"] == pytest.approx(expected, rel=0.01)


async def test_a_request_queued_behind_an_older_prefill_teaches_nothing() -> None:
    router, clock = one_server()
    for _ in range(5):
        first = await router.route(miss())
        clock.now += 0.05  # its prefill is under way (and counted queued until 1.5x its estimate)
        second = await router.route(miss())
        await router.finish(first, Outcome(ok=True))
        # Only what was left of the first's prefill delayed it: counting all 4,000 would read fast.
        ttft = (2 * PROMPT / FAST) - 0.05
        clock.now += ttft
        await router.finish(second, Outcome(ok=True, prompt_tokens=PROMPT, cached_tokens=0, ttft_s=ttft))
        clock.now += 0.5
    status = router.status()["prefill_speed_learning"]
    assert status["workers"] == {}
    assert status["skipped"]["queued"] == 5


async def test_a_later_arrival_spoils_only_a_prompt_longer_than_a_chunk() -> None:
    router, clock = one_server()
    for prompt, joined in ((PROMPT, 0), (10_000, 1)):
        # The second request comes 50 ms later: the first's prefill has begun, so a one-chunk prompt
        # is prefilled alone; a 10,000-token one (two chunks) shares its second chunk's batch.
        first = await router.route(miss(prompt))
        clock.now += 0.05
        second = await router.route(miss())
        ttft = prompt / FAST
        await router.finish(first, Outcome(ok=True, prompt_tokens=prompt, cached_tokens=0, ttft_s=ttft))
        await router.finish(second, Outcome(ok=False))
        clock.now += 1.0
        status = router.status()["prefill_speed_learning"]
        assert status["workers"]["http://only"]["samples"] == 1  # the 4,000-token one
        assert status["skipped"]["joined"] == joined


async def test_short_cached_unreported_and_failed_requests_teach_nothing() -> None:
    router, _, clock = cluster("round_robin")
    await serve(router, clock, prompt=500)  # 500 uncached tokens: the engine's fixed cost dominates
    route = await router.route(miss())
    # 3,500 of 4,000 tokens cached: 500 uncached
    await router.finish(route, Outcome(ok=True, prompt_tokens=PROMPT, cached_tokens=3500, ttft_s=0.05))
    route = await router.route(miss())
    await router.finish(route, Outcome(ok=True, prompt_tokens=PROMPT, cached_tokens=None, ttft_s=0.05))
    route = await router.route(miss())
    await router.finish(route, Outcome(ok=False, prompt_tokens=PROMPT, cached_tokens=0, ttft_s=0.05))
    status = router.status()["prefill_speed_learning"]
    assert status["workers"] == {}
    assert status["skipped"]["short"] == 2 and status["skipped"]["no_report"] == 1


async def test_the_running_batch_wait_is_not_taken_for_slow_prefill() -> None:
    registry = StaticRegistry(
        [StaticWorker("http://only", model="m", prefill_tokens_per_s=FAST, decode_step_s=0.1)]
    )
    registry.loads[TargetKey("http://only")] = ReportedLoad(
        waiting=0, running=5, token_usage=0.1, age_s=0.0, waiting_uncached_tokens=0
    )
    clock = Clock()
    router = Router(registry, MemoryStore(clock=clock), get_policy("prefix_aware"), seed=1, clock=clock)
    for _ in range(10):
        route = await router.route(miss())
        ttft = 0.05 + PROMPT / FAST  # half a 0.1 s decode step, then the prefill
        clock.now += ttft
        await router.finish(route, Outcome(ok=True, prompt_tokens=PROMPT, cached_tokens=0, ttft_s=ttft))
        clock.now += 0.5
    assert router.status()["prefill_speed_learning"]["workers"]["http://only"][
        "prefill_tokens_per_s"
    ] == pytest.approx(FAST, rel=0.001)


async def test_views_take_the_decode_step_the_registry_measured() -> None:
    registry = StaticRegistry(
        [StaticWorker("http://a", model="m", dp_size=2, decode_step_s=0.02)],
    )
    registry.loads[TargetKey("http://a", 1)] = ReportedLoad(  # type: ignore[assignment]
        waiting=0, running=4, token_usage=0.1, age_s=30.0, decode_step_s=0.055
    )
    clock = Clock()
    router = Router(registry, MemoryStore(clock=clock), get_policy("prefix_aware"), seed=1, clock=clock)
    await router.finish(await router.route(miss()), Outcome(ok=True))
    speeds = router.speeds()
    assert speeds["http://a@0"]["decode_step_s"] == 0.02  # no report: the seed
    # a measured step outlives the report's staleness (it is a speed, not a load)
    assert speeds["http://a@1"]["decode_step_s"] == 0.055
    assert router.status()["speeds"] == speeds
