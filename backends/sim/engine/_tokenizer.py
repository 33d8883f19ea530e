"""A deterministic, dependency-free stand-in for DeepSeek-V3's tokenizer.

Real DeepSeek-V3 uses a 129,280-entry byte-level BPE. Routing only needs its *properties*: the same text
always gives the same ids, English runs at roughly four characters a token, chat turns share token prefixes
exactly, special tokens are single ids, and any id the engine emits decodes to text. This module reproduces
those properties with an arithmetic vocabulary, so it needs no data files:

* DeepSeek-V3's special tokens at their real ids (BOS 0, EOS 1, ``<｜User｜>`` 128803, ...);
* 256 byte tokens (fallback for anything else, so every string round-trips);
* a few common punctuation/whitespace pieces;
* ~1,000 common English words, each in four spellings (``word``, `` word``, ``Word``, `` Word``);
* digit groups of 1-3 digits, with or without a leading space;
* letter chunks of 1-3 letters (lower, Title or UPPER case, with or without a leading space) for other
  words.

Text is first split into pieces GPT-style (an optional leading space then a run of letters, of up to three
digits, of other symbols, or whitespace), so a piece never spans a word boundary and a prefix of a text
tokenises to a prefix of its ids whenever the prefix ends at a piece boundary (special tokens always are
one).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType

from backends.sim.engine._words import COMMON_WORDS, MORE_WORDS, WORD_PIECES

VOCAB_SIZE = 129280

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"

BOS_TOKEN_ID = 0
EOS_TOKEN_ID = 1

SPECIAL_TOKENS: Mapping[str, int] = MappingProxyType(
    {
        BOS_TOKEN: 0,
        EOS_TOKEN: 1,
        PAD_TOKEN: 2,
        "<think>": 128798,
        "</think>": 128799,
        "<｜fim▁hole｜>": 128800,
        "<｜fim▁begin｜>": 128801,
        "<｜fim▁end｜>": 128802,
        USER_TOKEN: 128803,
        ASSISTANT_TOKEN: 128804,
        "<|EOT|>": 128805,
        "<｜tool▁calls▁begin｜>": 128806,
        "<｜tool▁calls▁end｜>": 128807,
        "<｜tool▁call▁begin｜>": 128808,
        "<｜tool▁call▁end｜>": 128809,
        "<｜tool▁outputs▁begin｜>": 128810,
        "<｜tool▁outputs▁end｜>": 128811,
        "<｜tool▁output▁begin｜>": 128812,
        "<｜tool▁output▁end｜>": 128813,
        "<｜tool▁sep｜>": 128814,
    }
)

_BYTE_BASE = 3
_PIECE_BASE = _BYTE_BASE + 256
_EXTRA_PIECES: tuple[str, ...] = (
    "\n\n", "\n\n\n", "  ", "   ", "    ", "        ", "\t\t", " (", " [", " {", " \"", " '", " -",
    " *", " /",
    " =", " +", " <", " >", " :", " &", " |", " #", " ##", " ###", "##", "###", "**", "...", "),", ").", ");",
    "\",", "\".", "',", "':", "\":", "()", "[]", "{}", "->", "=>", "==", "!=", "<=", ">=", "//", "/*", "*/",
    "```", " `", "`,", "`.", ".\n", ",\n", ":\n", ";\n", "?\n", "!\n", ")\n", "\n-", " ==", " !=", " ->",
)  # fmt: skip
_WORD_BASE = 400
_WORD_PIECE_BASE = 8600
_DIGIT_BASE = 8800
_DIGIT_SPAN = 10 + 100 + 1000
_LETTER_BASE = _DIGIT_BASE + 2 * _DIGIT_SPAN
_LETTER_SPAN = 26 + 26 * 26 + 26 * 26 * 26  # every string of 1-3 lowercase letters
_LETTER_CASES = 3  # lower, Title, UPPER
_LETTER_END = _LETTER_BASE + 2 * _LETTER_CASES * _LETTER_SPAN
_SPECIAL_FIRST = min(i for i in SPECIAL_TOKENS.values() if i > 2)

_PIECE_RE = re.compile(r" ?[A-Za-z]+| ?[0-9]{1,3}| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")
_ASCII_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_LOWER = "abcdefghijklmnopqrstuvwxyz"


def _letters_rank(lower: str) -> int:
    """Index of a 1-3 letter lowercase string among all such strings (shortest first)."""
    rank = 0
    for ch in lower:
        rank = rank * 26 + (ord(ch) - 97)
    return rank + (0, 0, 26, 26 + 676)[len(lower)]


def _letters_unrank(rank: int) -> str:
    if rank < 26:
        length = 1
    elif rank < 26 + 676:
        length, rank = 2, rank - 26
    else:
        length, rank = 3, rank - 26 - 676
    chars = []
    for _ in range(length):
        rank, digit = divmod(rank, 26)
        chars.append(_LOWER[digit])
    return "".join(reversed(chars))


def _letter_case(chunk: str) -> int | None:
    """0 lower, 1 Title, 2 UPPER, None for other mixes. One upper letter counts as UPPER."""
    if chunk.islower():
        return 0
    if chunk.isupper():
        return 2
    if chunk[0].isupper() and chunk[1:].islower():
        return 1
    return None


def _letter_chunk_text(index: int) -> str:
    """Text of letter-chunk token number ``index`` (0 <= index < 6 * _LETTER_SPAN)."""
    space, rest = divmod(index, _LETTER_CASES * _LETTER_SPAN)
    case, rank = divmod(rest, _LETTER_SPAN)
    text = _letters_unrank(rank)
    if case == 1:
        text = text.capitalize()
    elif case == 2:
        text = text.upper()
    return " " + text if space else text


def _digit_text(index: int) -> str:
    space, rank = divmod(index, _DIGIT_SPAN)
    if rank < 10:
        text = str(rank)
    elif rank < 110:
        text = f"{rank - 10:02d}"
    else:
        text = f"{rank - 110:03d}"
    return " " + text if space else text


class Tokenizer:
    """Deterministic text <-> token ids. Cheap to build (milliseconds), safe to share, no global state."""

    vocab_size = VOCAB_SIZE
    bos_token_id = BOS_TOKEN_ID
    eos_token_id = EOS_TOKEN_ID

    def __init__(self) -> None:
        words = tuple(dict.fromkeys(w for w in COMMON_WORDS + MORE_WORDS if w.isalpha()))
        table: dict[str, int] = {}
        texts: dict[int, str] = {}
        for byte in range(128):
            # ASCII bytes are also whole pieces ("." or "\n"); other bytes only appear as UTF-8 fragments.
            table[chr(byte)] = _BYTE_BASE + byte
        for offset, piece in enumerate(_EXTRA_PIECES):
            table[piece] = _PIECE_BASE + offset
            texts[_PIECE_BASE + offset] = piece
        pieces = tuple(p for p in dict.fromkeys(WORD_PIECES) if p not in set(words))
        for offset, piece in enumerate(pieces):
            table.setdefault(piece, _WORD_PIECE_BASE + offset)
            texts[_WORD_PIECE_BASE + offset] = piece
        word_ids: list[int] = []
        for index, word in enumerate(words):
            base = _WORD_BASE + 4 * index
            for variant, text in enumerate((word, " " + word, word.capitalize(), " " + word.capitalize())):
                if table.get(text, 0) < _PIECE_BASE:  # a word beats a lone ASCII byte ("a", "I")
                    table[text] = base + variant
                texts[base + variant] = text
            word_ids.append(base)
        if (
            _WORD_BASE + 4 * len(words) > _WORD_PIECE_BASE
            or _WORD_PIECE_BASE + len(pieces) > _DIGIT_BASE
            or _PIECE_BASE + len(_EXTRA_PIECES) > _WORD_BASE
        ):
            raise AssertionError("tokenizer id ranges overlap")
        self._table = table
        self._texts = texts
        self._specials = dict(SPECIAL_TOKENS)
        self._special_texts = {token_id: text for text, token_id in SPECIAL_TOKENS.items()}
        self._special_re = re.compile(
            "|".join(re.escape(s) for s in sorted(SPECIAL_TOKENS, key=len, reverse=True))
        )
        self._word_lengths = sorted({len(w) for w in words}, reverse=True)
        self._piece_lengths = sorted({len(p) for p in pieces}, reverse=True)
        # Ids of "word" (no space), " word", "Word", " Word" for each common word: what generated
        # text is made of.
        self.word_token_ids: tuple[int, ...] = tuple(word_ids)
        self.period_id = table["."]
        self.comma_id = table[","]

    # -- encoding -------------------------------------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings become their single ids (as HF tokenizers do)."""
        ids: list[int] = [BOS_TOKEN_ID] if add_bos else []
        position = 0
        for match in self._special_re.finditer(text):
            if match.start() > position:
                self._encode_plain(text[position : match.start()], ids)
            ids.append(self._specials[match.group()])
            position = match.end()
        if position < len(text):
            self._encode_plain(text[position:], ids)
        return ids

    def _encode_plain(self, text: str, ids: list[int]) -> None:
        table = self._table
        for piece in _PIECE_RE.findall(text):
            token_id = table.get(piece)
            if token_id is not None:
                ids.append(token_id)
            else:
                self._encode_piece(piece, ids)

    def _encode_piece(self, piece: str, ids: list[int]) -> None:
        space = piece[0] == " " and len(piece) > 1
        body = piece[1:] if space else piece
        if body[0] in _ASCII_LETTERS and all(ch in _ASCII_LETTERS for ch in body):
            self._encode_letters(body, space, ids)
        elif body.isdigit() and body.isascii():
            rank = int(body) + (0, 0, 10, 110)[len(body)]
            ids.append(_DIGIT_BASE + (_DIGIT_SPAN if space else 0) + rank)
        else:
            for byte in piece.encode("utf-8"):
                ids.append(_BYTE_BASE + byte)

    def _encode_letters(self, body: str, space: bool, ids: list[int]) -> None:
        # A known word followed by a suffix ("working" = "work" + "ing") keeps unknown words short.
        prefix = " " if space else ""
        for length in self._word_lengths:
            if length < len(body):
                word_id = self._table.get(prefix + body[:length])
                if word_id is not None:
                    ids.append(word_id)
                    body, space = body[length:], False
                    break
        start = 0
        table = self._table
        while start < len(body):
            for length in self._piece_lengths:
                piece_id = table.get(body[start : start + length]) if start + length <= len(body) else None
                if piece_id is not None and piece_id >= _WORD_PIECE_BASE and not space:
                    ids.append(piece_id)
                    start += length
                    break
            else:
                piece_id = None
            if piece_id is not None:
                continue
            end = min(start + 3, len(body))
            while (case := _letter_case(body[start:end])) is None:
                end -= 1
            chunk = body[start:end]
            index = (_LETTER_CASES * _LETTER_SPAN if space else 0) + case * _LETTER_SPAN
            ids.append(_LETTER_BASE + index + _letters_rank(chunk.lower()))
            start, space = end, False

    # -- decoding -------------------------------------------------------------------------------------------

    def token_text(self, token_id: int, *, skip_special_tokens: bool = True) -> str:
        """Text of one token; "" for special tokens when skipped and for ids outside the vocabulary.

        Byte tokens of non-ASCII UTF-8 fragments decode to U+FFFD alone; use :meth:`decode` for whole texts.
        """
        return self.decode((token_id,), skip_special_tokens=skip_special_tokens)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``. Every id in ``range(vocab_size)`` decodes; others are skipped (as HF does)."""
        out = bytearray()
        texts = self._texts
        for token_id in ids:
            text = texts.get(token_id)
            if text is not None:
                out += text.encode()
            elif _BYTE_BASE <= token_id < _PIECE_BASE:
                out.append(token_id - _BYTE_BASE)
            elif token_id in self._special_texts:
                if not skip_special_tokens:
                    out += self._special_texts[token_id].encode()
            elif _DIGIT_BASE <= token_id < _LETTER_BASE:
                out += _digit_text(token_id - _DIGIT_BASE).encode()
            elif _LETTER_BASE <= token_id < _LETTER_END:
                out += _letter_chunk_text(token_id - _LETTER_BASE).encode()
            elif 0 <= token_id < VOCAB_SIZE:
                # Unassigned ids (as in random-token benchmarks) still read as text: a letter chunk.
                out += _letter_chunk_text(token_id % (2 * _LETTER_CASES * _LETTER_SPAN)).encode()
        return out.decode("utf-8", errors="replace")

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_texts

    def count(self, texts: Sequence[str]) -> int:
        """Total tokens of several texts (convenience for estimates)."""
        return sum(len(self.encode(t)) for t in texts)
