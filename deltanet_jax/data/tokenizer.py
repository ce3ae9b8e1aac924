"""Byte-level tokenizer: every UTF-8 byte is one token (vocabulary of 256)."""

from __future__ import annotations

from typing import Iterable

import numpy as np


class ByteTokenizer:
    """Maps text to its UTF-8 bytes and back; token ids are the byte values 0..255."""

    vocab_size: int = 256

    def encode(self, text: str) -> np.ndarray:
        """`text` -> int32 array [len(text.encode("utf-8"))] of byte values."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int] | np.ndarray | bytes) -> str:
        """Token ids [N] (ints in 0..255) -> text; invalid UTF-8 becomes U+FFFD."""
        if isinstance(ids, (bytes, bytearray)):
            return bytes(ids).decode("utf-8", errors="replace")
        arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
        if arr.ndim != 1:
            raise ValueError(f"decode expects a 1-D sequence of ids, got shape {arr.shape}")
        if arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() > 255):
            raise ValueError("decode expects integer ids in 0..255")
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
