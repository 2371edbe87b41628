"""Byte-level tokenizer: token ids are the UTF-8 bytes of the text.

No vocabulary file, no merges and no unknown tokens, which keeps the bundled tiny LM
self-contained and makes every string (including arbitrary source code) encodable.
"""

from __future__ import annotations

from collections.abc import Iterable

VOCAB_SIZE = 256


def encode(text: str) -> list[int]:
    """UTF-8 bytes of ``text`` as ints in ``[0, 256)``."""
    return list(text.encode("utf-8"))


def decode(ids: Iterable[int]) -> str:
    """Inverse of ``encode``; invalid UTF-8 (e.g. a sampled partial character) becomes U+FFFD."""
    return bytes(ids).decode("utf-8", errors="replace")
