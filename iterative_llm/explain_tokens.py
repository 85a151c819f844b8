"""Tokens for `iterative-llm explain`: each token id with the bytes and text it stands for, and a note
on each token that holds only part of a character."""

from __future__ import annotations

from dataclasses import dataclass

from .tokenization import token_bytes


@dataclass
class Token:
    index: int
    id: int
    raw: bytes  # the UTF-8 bytes this token stands for
    text: str | None  # the bytes as text, None when they are not whole characters
    special: bool = False
    note: str = ""  # e.g. which character a partial token is part of

    @property
    def shown(self) -> str:
        """The piece as a Python string literal, or a marker for bytes that are not whole characters."""
        return repr(self.text) if self.text is not None else "(partial character)"


def tokens_of(tokenizer, ids: list[int]) -> list[Token]:
    """A Token (bytes and text) for each id; the bytes come from `tokenization.token_bytes`."""
    special_ids = set(tokenizer.all_special_ids)
    tokens = []
    for index, (token_id, raw) in enumerate(zip(ids, token_bytes(tokenizer, ids))):
        special = token_id in special_ids
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = None  # part of a character whose other bytes are in a neighbouring token
        tokens.append(Token(index, int(token_id), raw, text, special))
    return tokens


def tokenize(tokenizer, text: str) -> list[Token]:
    """The tokens of `text`, with a note on each token that holds only part of a character."""
    tokens = tokens_of(tokenizer, tokenizer(text)["input_ids"])
    _note_split_characters(tokens, text)
    return tokens


def _note_split_characters(tokens: list[Token], text: str) -> None:
    """Name the character a token holds only part of (a byte-level BPE may split a character).

    Works when the tokens' bytes, joined, are exactly the sentence's UTF-8 bytes (true for the
    project's tokenizer, which adds no special tokens and normalises nothing).
    """
    encoded = text.encode("utf-8")
    if b"".join(t.raw for t in tokens) != encoded:
        return
    # For each byte offset: the character it belongs to, and where that character starts and ends.
    owner = []
    for ch in text:
        width = len(ch.encode("utf-8"))
        start = len(owner)
        owner += [(ch, start, start + width)] * width
    offset = 0
    for token in tokens:
        start, end = offset, offset + len(token.raw)
        offset = end
        if token.text is not None and token.text.encode("utf-8") == token.raw:
            first_ok = start == 0 or owner[start][1] == start
            last_ok = owner[end - 1][2] == end
            if first_ok and last_ok:
                continue
        parts = []
        for ch, ch_start, ch_end in dict.fromkeys(owner[start:end]):
            lo, hi = max(start, ch_start) - ch_start + 1, min(end, ch_end) - ch_start
            if lo == 1 and hi == ch_end - ch_start:
                continue
            which = f"byte {lo}" if lo == hi else f"bytes {lo}-{hi}"
            parts.append(f"{which} of the {ch_end - ch_start} bytes of {ch!r}")
        token.note = "; ".join(parts)


def _hex(raw: bytes) -> str:
    return " ".join(f"{b:02x}" for b in raw)
