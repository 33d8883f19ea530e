"""PD settings, resolved once at start-up."""

from __future__ import annotations

import msgspec

__all__ = ["PDSettings"]


class PDSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How the gateway serves models that have prefill and decode pools.

    ``direct_below_tokens``: conditional disaggregation. When the best prefill target would have to
    prefill fewer than this many uncached prompt tokens, the request skips the prefill hop and goes
    to a regular worker of the model, which prefills it itself (a SGLang decode server cannot: it
    refuses a request without a bootstrap room). 0 disables it; with no regular worker for the model
    every request is disaggregated.

    ``fallback_to_regular``: when the prefill or decode pool has no healthy server, serve the model's
    requests on its regular workers (if any) instead of answering 503 at once.
    """

    direct_below_tokens: int = 0
    fallback_to_regular: bool = False
    # Extra attempts on a new prefill/decode pair (with a new room) after a failure the client has
    # not seen any byte of.
    retries: int = 2
    retry_after_s: int = 2
    # Longest wait for the prefill's answer (queue + prefill + KV transfer). SGLang itself waits
    # 300 s for a decode that never shows up; this gateway gives up (and retries) much earlier.
    prefill_timeout_s: float = 120.0
    # Streaming: once the prefill answered (its KV is transferred), longest wait for the decode's
    # first byte before the pair is given up.
    first_byte_after_prefill_s: float = 30.0
    # After the response is complete, how long the prefill leg may still take to report.
    prefill_drain_s: float = 5.0
    # Decode policy: "least" scans the pool, "power_of_two" samples two targets.
    decode_mode: str = "least"
    # Decode targets whose KV cache would be fuller than this are avoided unless all are.
    decode_kv_high: float = 0.9

    def __post_init__(self) -> None:
        if self.direct_below_tokens < 0:
            raise ValueError(f"direct_below_tokens must be >= 0, got {self.direct_below_tokens}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        for name in ("prefill_timeout_s", "first_byte_after_prefill_s", "prefill_drain_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.decode_mode not in ("least", "power_of_two"):
            raise ValueError(f"decode_mode must be 'least' or 'power_of_two', got {self.decode_mode!r}")
        if not 0.0 < self.decode_kv_high <= 1.0:
            raise ValueError(f"decode_kv_high must be in (0, 1], got {self.decode_kv_high}")
