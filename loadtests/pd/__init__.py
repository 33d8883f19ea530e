"""PD benchmarks: disaggregated vs regular serving at the same simulated GPU count, and Cachet vs
sglang-router 0.3.2 in PD mode on the same prefill/decode servers (see docs/bench-pd.md)."""
