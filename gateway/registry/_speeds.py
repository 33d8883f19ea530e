"""A DP rank's decode step, measured from the load reports the registry polls.

SGLang reports no speeds in ``/server_info``; its ``/v1/loads`` does report, per rank, the requests
running and ``gen_throughput`` (tokens generated per second over its last logging window). One
decode step serves every running request, so step ≈ running / gen_throughput.

- Only when a batch runs (``running > 0``, ``gen_throughput > 0``) and has kept about its size since
  the previous poll (within 1.5×): the throughput is a window over past steps (SGLang logs it every
  40 decode steps), so right after the batch grew or shrank it describes another batch. An idle
  rank keeps its last estimate (its stale throughput says nothing about a step now).
- Smoothed in log space with each sample's pull clamped to 2×: one odd report (a window that
  straddled a burst of prefills) moves the estimate by at most 2^0.3 ≈ 1.23×.

What the number is: on real SGLang the window's wall time also holds the prefill batches run
between decode steps, so under prefill-heavy load this overestimates the step a little; with
speculative decoding (MTP) ``gen_throughput`` counts accepted tokens, so this is the time per
accepted token (the step over the accept length, ~2.5× shorter than the forward pass).
"""

from __future__ import annotations

import math

__all__ = ["DecodeStepEstimate"]

_ALPHA = 0.3
_MAX_PULL = math.log(2.0)
_STABLE_BATCH = 1.5
_RANGE_S = (1e-4, 5.0)


class DecodeStepEstimate:
    """One rank's decode step estimate; ``observe`` takes each load report of the rank."""

    __slots__ = ("_last_running", "samples", "step_s")

    def __init__(self) -> None:
        self.step_s: float | None = None
        self.samples = 0
        self._last_running: int | None = None

    def observe(self, running: int | None, gen_throughput: float | None, seed_s: float) -> float | None:
        """Feed one report; returns the estimate (None until the first usable sample)."""
        last, self._last_running = self._last_running, running
        if not running or running <= 0 or not gen_throughput or gen_throughput <= 0:
            return self.step_s
        if last is None or last <= 0 or not (1 / _STABLE_BATCH <= running / last <= _STABLE_BATCH):
            return self.step_s
        sample = running / gen_throughput
        old = self.step_s if self.step_s is not None else seed_s
        pull = math.log(sample / old)
        pull = min(max(pull, -_MAX_PULL), _MAX_PULL)
        low, high = _RANGE_S
        self.step_s = min(max(old * math.exp(_ALPHA * pull), low), high)
        self.samples += 1
        return self.step_s
