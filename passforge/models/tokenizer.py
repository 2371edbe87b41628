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
    """Inverse of ``encode``; invalid UTF-8 (e.g. a sampled partial character) becomes U+FFFD, and so does an id
    outside the byte range: a preset with a larger vocabulary (``llama-100m``: 32000, random weights) samples
    them, and the text must still print."""
    pieces, run = [], bytearray()
    for i in ids:
        if 0 <= i < VOCAB_SIZE:
            run.append(i)
            continue
        pieces.append(run.decode("utf-8", errors="replace") + "\ufffd")
        run = bytearray()
    return "".join(pieces) + run.decode("utf-8", errors="replace")
