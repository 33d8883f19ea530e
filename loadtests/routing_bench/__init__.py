"""The HTTP routing benchmark: real processes on loopback (``python -m loadtests.routing_bench``)."""

from loadtests.routing_bench.client import HttpRecord, run_open_loop

__all__ = ["HttpRecord", "run_open_loop"]
