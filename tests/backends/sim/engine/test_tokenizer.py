"""The tokenizer stand-in: deterministic, ~4 characters a token on English, lossless, all ids decodable."""

from __future__ import annotations

import random

import pytest

from backends.sim.engine import (
    ASSISTANT_TOKEN,
    BOS_TOKEN,
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    SPECIAL_TOKENS,
    USER_TOKEN,
    VOCAB_SIZE,
    Tokenizer,
)

PROSE = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness. Routing requests to the server that already holds the prompt prefix in "
    "its cache avoids recomputing attention over the shared tokens, which reduces the time to first token "
    "considerably for long system prompts and multi-turn conversations. The gateway picks a data parallel "
    "rank by weighing the predicted cached tokens against the queue that is already waiting there."
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


def test_same_text_gives_same_ids_across_instances(tok: Tokenizer) -> None:
    assert tok.encode(PROSE) == Tokenizer().encode(PROSE)


def test_english_prose_is_about_four_characters_a_token(tok: Tokenizer) -> None:
    ratio = len(PROSE) / len(tok.encode(PROSE))
    assert 3.5 <= ratio <= 5.0


@pytest.mark.parametrize(
    "text",
    [
        PROSE,
        "",
        "  leading and trailing spaces  ",
        "Tabs\tand\nnewlines\n\n\nand    runs of spaces",
        "Numbers: 3.14159, 1,000,000 and 2026-11-27T18:35Z",
        "Über-naïve café, résumé; 日本語のテキスト; emoji 🚀🔥",
        "def route(req):\n    return min(targets, key=lambda t: t.cost)  # noqa\n",
        "MixedCASE iPhone XMLHttpRequest camelCaseWords ALLCAPS",
        "<think>reasoning</think> stray ｜ bars ▁ and <｜not special｜>",
    ],
)
def test_decode_inverts_encode(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_special_tokens_are_single_ids_and_skipped_on_decode(tok: Tokenizer) -> None:
    ids = tok.encode(f"{BOS_TOKEN}Hello{USER_TOKEN}Hi there{ASSISTANT_TOKEN}")
    assert ids[0] == BOS_TOKEN_ID
    assert SPECIAL_TOKENS[USER_TOKEN] in ids
    assert ids[-1] == SPECIAL_TOKENS[ASSISTANT_TOKEN] == 128804
    assert tok.decode(ids) == "HelloHi there"
    assert (
        tok.decode(ids, skip_special_tokens=False) == f"{BOS_TOKEN}Hello{USER_TOKEN}Hi there{ASSISTANT_TOKEN}"
    )


def test_add_bos_prepends_bos(tok: Tokenizer) -> None:
    assert tok.encode("hi", add_bos=True) == [BOS_TOKEN_ID, *tok.encode("hi")]


def test_every_id_in_the_vocabulary_decodes_and_others_are_skipped(tok: Tokenizer) -> None:
    rng = random.Random(7)
    ids = [rng.randrange(VOCAB_SIZE) for _ in range(2000)]
    text = tok.decode(ids)
    assert isinstance(text, str) and text
    assert tok.decode([-1, VOCAB_SIZE, VOCAB_SIZE + 5]) == ""
    assert tok.decode([EOS_TOKEN_ID]) == ""


def test_word_tokens_reencode_to_themselves(tok: Tokenizer) -> None:
    # Generated text is built from these; re-encoding it must give the same ids (next turn's cache hit).
    for base in tok.word_token_ids:
        for variant in range(4):
            token_id = base + variant
            assert tok.encode(tok.decode([token_id])) == [token_id]


def test_text_prefix_at_piece_boundary_is_token_prefix(tok: Tokenizer) -> None:
    full = tok.encode(PROSE)
    cut = PROSE.index(" Routing")
    assert full[: len(tok.encode(PROSE[:cut]))] == tok.encode(PROSE[:cut])
