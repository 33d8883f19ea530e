"""How much CPU the engine itself costs: ``python -m backends.sim.engine.bench [--seconds S]``.

Keeps ``--streams`` requests in flight over ``--servers`` h200-dp8 servers (8 DP ranks each), stepping every
rank as fast as possible, and reports CPU microseconds per step and how much of one core real-time serving
would take (each rank steps once per modelled step duration at time scale 1).
"""

from __future__ import annotations

import argparse
import random
import time

from backends.sim.engine._presets import EngineConfig
from backends.sim.engine._server import ServerEngine
from backends.sim.engine._tokenizer import Tokenizer
from backends.sim.engine._types import RequestFinished, SimRequest, TokensGenerated


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--output-tokens", type=int, default=256)
    args = parser.parse_args(argv)

    tokenizer = Tokenizer()
    servers = [ServerEngine(EngineConfig(preset="h200-dp8"), tokenizer) for _ in range(args.servers)]
    ranks = [rank for server in servers for rank in server.ranks]
    rng = random.Random(0)
    system = tokenizer.encode("You are a helpful assistant. " * 200)
    submitted = 0

    def submit(index: int) -> None:
        nonlocal submitted
        question = [rng.randrange(5_000, 100_000) for _ in range(300)]
        ranks[index].add(SimRequest(f"r{submitted}", system + question, args.output_tokens, ignore_eos=True))
        submitted += 1

    for i in range(args.streams):
        submit(i % len(ranks))
    steps = tokens = 0
    modelled = 0.0
    start = time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        for index, rank in enumerate(ranks):
            if not rank.has_work():
                continue
            result = rank.step()
            steps += 1
            modelled += result.duration_s
            for event in result.events:
                if isinstance(event, TokensGenerated):
                    tokens += len(event.token_ids)
                elif isinstance(event, RequestFinished):
                    submit(index)
    elapsed = time.perf_counter() - start
    per_step_us = elapsed / steps * 1e6
    mean_step_s = modelled / steps
    # At time scale 1 every busy rank steps once per mean_step_s; that costs per_step_us each time.
    core_share = len(ranks) * per_step_us * 1e-6 / mean_step_s
    print(
        f"{args.streams} streams over {len(ranks)} ranks: {steps} steps in {elapsed:.2f} s CPU "
        f"({per_step_us:.1f} us/step, {tokens / elapsed:,.0f} tokens/s of CPU); "
        f"modelled step {mean_step_s * 1e3:.1f} ms; "
        f"real-time serving at time scale 1 needs {core_share:.1%} of one core"
    )


if __name__ == "__main__":
    main()
