"""Deterministic English filler text of an exact length in simulator tokens.

The simulator's tokenizer (backends.sim.engine.Tokenizer) gives each of ~1,000 common English words,
with its leading space, one token. Filler text is therefore a run of " word" pieces drawn from that
vocabulary: n words are exactly n tokens, texts join without changing how either side tokenises,
and a cut after k words is a k-token prefix. The same seed always yields the same text; different
seeds diverge within a word or two, so unrelated texts share no long prefix. (Against a real
DeepSeek tokenizer the same text is plain English of about the same token count.)
"""

from __future__ import annotations

import functools
import random

from backends.sim.engine import Tokenizer

__all__ = ["filler_text", "filler_words", "vocabulary"]


@functools.cache
def vocabulary() -> tuple[str, ...]:
    """The single-token " word" pieces, in the tokenizer's order."""
    tokenizer = Tokenizer()
    pieces = []
    for word_id in tokenizer.word_token_ids:
        piece = tokenizer.decode([word_id + 1])  # the " word" spelling
        if len(tokenizer.encode(piece)) == 1:
            pieces.append(piece)
    if len(pieces) < 100:
        raise RuntimeError("the simulator tokenizer has too few single-token words for filler text")
    return tuple(pieces)


def filler_words(seed: str | int, tokens: int) -> list[str]:
    """``tokens`` single-token " word" pieces, deterministically from ``seed``."""
    if tokens <= 0:
        return []
    pieces = vocabulary()
    rng = random.Random(f"cachet-filler:{seed}")
    return [pieces[rng.randrange(len(pieces))] for _ in range(tokens)]


def filler_text(seed: str | int, tokens: int) -> str:
    """Exactly ``tokens`` simulator tokens of English words (each with its leading space)."""
    return "".join(filler_words(seed, tokens))
