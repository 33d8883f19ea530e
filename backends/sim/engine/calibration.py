"""Print the tables of docs/simulator.md: ``python -m backends.sim.engine.calibration``.

Every number is measured by stepping engines in virtual time (no wall clock), so the output is deterministic.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

from backends.sim.engine._presets import PRESETS, EngineConfig
from backends.sim.engine._server import ServerEngine
from backends.sim.engine._types import SimRequest
from backends.sim.engine._virtual import RequestTiming, run_closed_loop, run_closed_loop_server


def requests(prompt_tokens: int, output_tokens: int, tag: str) -> Callable[[int], SimRequest]:
    def make(i: int) -> SimRequest:
        ids = [1000 + (i * 7919 + j * 31) % 90_000 for j in range(prompt_tokens)]
        return SimRequest(f"{tag}{i}", ids, output_tokens, ignore_eos=True)

    return make


def throughput(timings: list[RequestTiming]) -> float:
    return sum(t.completion_tokens for t in timings) / max(t.finished_s or 0.0 for t in timings)


def preset_table() -> list[str]:
    rows = [
        "| preset | MTP | dp | weights/GPU | KV/GPU | max_total_num_tokens/rank | max running/rank "
        "| chunk/rank | 1-user decode tok/s | 1k-prompt TTFT | prefill tok/s/rank "
        "| c=128 out tok/s (one rank) | c=128 TTFT |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in PRESETS:
        for mtp in (False, True):
            config = EngineConfig(preset=name, mtp=mtp)
            engine = ServerEngine(config)
            single = run_closed_loop(
                ServerEngine(config).ranks[0], requests(1000, 256, "s"), concurrency=1, total_requests=3
            )
            prefill = run_closed_loop(
                ServerEngine(config).ranks[0], requests(8192, 1, "p"), concurrency=4, total_requests=16
            )
            busy = run_closed_loop(
                ServerEngine(config).ranks[0], requests(1000, 128, "c"), concurrency=128, total_requests=384
            )
            rows.append(
                f"| {name} | {'on' if mtp else 'off'} | {engine.dp_size} "
                f"| {engine.weight_bytes_per_gpu / 1e9:.1f} GB "
                f"| {engine.kv_cache_bytes_per_gpu / 1e9:.1f} GB | {engine.max_total_num_tokens:,} "
                f"| {engine.max_running_requests} | {engine.chunked_prefill_size} "
                f"| {statistics.mean(t.decode_tokens_per_s for t in single):.1f} "
                f"| {statistics.mean(t.ttft_s for t in single) * 1e3:.0f} ms "
                f"| {16 * 8192 / max(t.finished_s or 0.0 for t in prefill):,.0f} "
                f"| {throughput(busy):,.0f} | {statistics.mean(t.ttft_s for t in busy):.2f} s |"
            )
    return rows


def rtt_table() -> list[str]:
    rows = ["| h20-tp16 RTT | 1-user decode tok/s |", "|---|---|"]
    for rtt in (0.193, 0.5, 1.0, 2.193):
        engine = ServerEngine(EngineConfig(preset="h20-tp16", rtt_ms=rtt))
        single = run_closed_loop(engine.ranks[0], requests(1000, 256, "s"), concurrency=1, total_requests=3)
        rows.append(f"| {rtt} ms | {statistics.mean(t.decode_tokens_per_s for t in single):.2f} |")
    return rows


def dp_table() -> list[str]:
    rows = ["| workload | preset | output tok/s | mean TTFT | retractions |", "|---|---|---|---|---|"]
    for prompt, output, users, rounds in ((1000, 256, 128, 2), (4000, 512, 256, 1), (2000, 1024, 256, 1)):
        for name in ("h200-tp8", "h200-dp8"):
            engine = ServerEngine(EngineConfig(preset=name))
            timings = run_closed_loop_server(
                engine, requests(prompt, output, "d"), concurrency=users, total_requests=users * rounds
            )
            rows.append(
                f"| {prompt} in / {output} out, {users} users x {rounds} | {name} "
                f"| {throughput(timings):,.0f} | {statistics.mean(t.ttft_s for t in timings):.1f} s "
                f"| {sum(r.num_retractions for r in engine.ranks)} |"
            )
    return rows


def main() -> None:
    for table in (preset_table(), rtt_table(), dp_table()):
        print("\n".join(table))
        print()


if __name__ == "__main__":
    main()
