"""Benchmarks and load tests (not shipped to production paths).

- ``loadtests.workloads``: generated-shared-prefix, multi-round chat and the Mooncake trace as plain
  ``BenchRequest`` data.
- ``python -m loadtests.replay``: routing policies over the simulator's engine model in virtual time.
- ``python -m loadtests.routing_bench``: Cachet vs sglang-router / vllm-router over HTTP on loopback.
- ``loadtests/locustfile.py``: the same workloads for operators' locust runs.
- ``loadtests.overhead``, ``loadtests.peers``, ``loadtests.trivial_upstream``: proxy-overhead benchmarks
  and the peer-router launcher.

Results go to ``loadtests/results/`` (git-ignored); write-ups live in ``docs/bench-*.md``.
"""
