"""Workload choice on a command line, shared by the replayer and the HTTP benchmark."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

from loadtests.workloads.mooncake import DEFAULT_TRACE, mooncake_trace
from loadtests.workloads.multi_round import multi_round_chat
from loadtests.workloads.request import BenchRequest
from loadtests.workloads.shared_prefix import generated_shared_prefix

__all__ = ["WORKLOADS", "add_workload_args", "build_workload", "describe"]

WORKLOADS = ("shared-prefix", "multi-round", "mooncake")


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workload")
    group.add_argument("--workload", choices=WORKLOADS, default="shared-prefix")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument(
        "--rate",
        type=float,
        default=None,
        help="arrivals per second (shared-prefix: requests, multi-round: new users); default: all at once",
    )
    group.add_argument("--groups", type=int, default=16, help="shared-prefix: G")
    group.add_argument("--prompts-per-group", type=int, default=16, help="shared-prefix: P")
    group.add_argument("--system-tokens", type=int, default=2048, help="shared-prefix S / multi-round system")
    group.add_argument(
        "--question-tokens", type=int, default=128, help="shared-prefix Q / multi-round question"
    )
    group.add_argument("--output-tokens", type=int, default=128, help="shared-prefix O / multi-round answer")
    group.add_argument("--zipf", type=float, default=None, help="shared-prefix: Zipf exponent of group sizes")
    group.add_argument("--users", type=int, default=16, help="multi-round: U")
    group.add_argument("--rounds", type=int, default=5, help="multi-round: R")
    group.add_argument("--user-context-tokens", type=int, default=1024, help="multi-round: per-user context")
    group.add_argument("--think-s", type=float, default=2.0, help="multi-round: pause between rounds")
    group.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="mooncake: trace file")
    group.add_argument("--limit", type=int, default=None, help="mooncake: first N requests")
    group.add_argument(
        "--time-scale", type=float, default=1.0, help="mooncake: multiply arrival times by this"
    )
    group.add_argument("--max-input-tokens", type=int, default=None, help="mooncake: drop longer prompts")


def build_workload(args: argparse.Namespace) -> Iterable[BenchRequest]:
    """The requests, sorted by arrival (Mooncake lazily: its prompts are large)."""
    if args.workload == "shared-prefix":
        requests = generated_shared_prefix(
            groups=args.groups,
            prompts_per_group=args.prompts_per_group,
            system_tokens=args.system_tokens,
            question_tokens=args.question_tokens,
            output_tokens=args.output_tokens,
            rate_per_s=args.rate,
            zipf_exponent=args.zipf,
            seed=args.seed,
        )
        return sorted(requests, key=lambda r: r.arrival_s)
    if args.workload == "multi-round":
        return multi_round_chat(
            users=args.users,
            rounds=args.rounds,
            system_tokens=args.system_tokens,
            user_context_tokens=args.user_context_tokens,
            question_tokens=args.question_tokens,
            answer_tokens=args.output_tokens,
            think_s=args.think_s,
            user_rate_per_s=args.rate,
            seed=args.seed,
        )
    return mooncake_trace(
        args.trace, limit=args.limit, time_scale=args.time_scale, max_input_tokens=args.max_input_tokens
    )


def describe(args: argparse.Namespace) -> str:
    if args.workload == "shared-prefix":
        zipf = f", Zipf {args.zipf}" if args.zipf is not None else ""
        return (
            f"generated-shared-prefix G={args.groups} P={args.prompts_per_group} S={args.system_tokens} "
            f"Q={args.question_tokens} O={args.output_tokens}{zipf}, rate={args.rate}/s, seed={args.seed}"
        )
    if args.workload == "multi-round":
        return (
            f"multi-round chat U={args.users} R={args.rounds} system={args.system_tokens} "
            f"context={args.user_context_tokens} Q={args.question_tokens} A={args.output_tokens} "
            f"think={args.think_s}s, user rate={args.rate}/s, seed={args.seed}"
        )
    return (
        f"Mooncake trace {args.trace.name} limit={args.limit} time_scale={args.time_scale} "
        f"max_input_tokens={args.max_input_tokens}"
    )
