"""What the simulated model "says": deterministic, decodable, English-looking output tokens.

Every choice is a hash of (seed, prompt, position), so the same prompt gives the same answer on every server
and in every run (like greedy decoding), a PD decode server continues exactly where the prefill server's first
token left off, and MTP acceptance is reproducible. Answers are sentences of common words with commas and
periods; unless ``ignore_eos``, the model ends with a period and EOS at a prompt-dependent natural length.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections.abc import Sequence
from typing import TYPE_CHECKING

from backends.sim.engine._tokenizer import EOS_TOKEN_ID, Tokenizer

if TYPE_CHECKING:
    from backends.sim.engine._perf import PerfModel

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_FUNCTION_WORDS = 48  # the first words of the list are the most frequent; draw them more often
_MEAN_NATURAL_TOKENS = 400
_MIN_NATURAL_TOKENS = 16


def mix64(value: int) -> int:
    """SplitMix64 finaliser: a fast, well-spread 64-bit hash of an integer."""
    value = (value + _GOLDEN) & _MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK
    return value ^ (value >> 31)


class TextGenerator:
    def __init__(self, tokenizer: Tokenizer, *, seed: int, natural_stop: bool) -> None:
        self._tokenizer = tokenizer
        self._seed = mix64(seed & _MASK)
        self._natural_stop = natural_stop
        self._words = tokenizer.word_token_ids
        self._period = tokenizer.period_id
        self._comma = tokenizer.comma_id
        self.eos_token_id = EOS_TOKEN_ID

    def stream_key(self, input_ids: Sequence[int]) -> int:
        """Key of one prompt's output stream: a BLAKE2b digest of the whole prompt, so it is the same in every
        process, Python version and platform (a PD prefill and decode server must agree on it)."""
        try:
            data = array("q", input_ids).tobytes()
        except (OverflowError, TypeError):
            data = repr(list(input_ids)).encode()
        digest = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
        return mix64(self._seed ^ digest)

    def natural_length(self, stream: int) -> int:
        """Tokens the model would generate before EOS: exponential with mean ~400, at least 16."""
        uniform = (mix64(stream ^ 0x5151) >> 11) / float(1 << 53)
        return _MIN_NATURAL_TOKENS + int(-_MEAN_NATURAL_TOKENS * math.log1p(-uniform))

    def next_token(self, stream: int, position: int, previous: int | None, allow_eos: bool) -> int:
        """The output token at ``position`` (0-based) given the token before it."""
        if allow_eos and self._natural_stop:
            natural = self.natural_length(stream)
            if position >= natural:
                return EOS_TOKEN_ID
            if position == natural - 1 and previous not in (self._period, self._comma):
                return self._period
        h = mix64(stream ^ (position * _GOLDEN & _MASK))
        roll = h % 100
        if position >= 4 and previous not in (self._period, self._comma, None):
            if roll < 6:
                return self._period
            if roll < 11:
                return self._comma
        pool = _FUNCTION_WORDS if (h >> 20) % 100 < 45 else len(self._words)
        base = self._words[(h >> 32) % pool]
        if position == 0:
            return base + 2  # "Word": the answer starts right after <｜Assistant｜>
        if previous == self._period:
            return base + 3  # " Word"
        return base + 1  # " word"

    def accepted_tokens(self, stream: int, position: int, perf: PerfModel) -> int:
        """Tokens one MTP verify step yields: 1 + the run of accepted draft tokens (1 without MTP)."""
        if not perf.mtp:
            return 1
        cal = perf.cal
        threshold = int(cal.mtp_accept_prob * 1_000_000)
        count = 1
        for draft in range(cal.mtp_draft_steps):
            h = mix64(stream ^ ((position * 8 + draft + 1) * 0xD6E8FEB86659FD93 & _MASK))
            if h % 1_000_000 >= threshold:
                break
            count += 1
        return count

    def token_text(self, token_id: int) -> str:
        return self._tokenizer.token_text(token_id)
