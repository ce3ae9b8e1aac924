"""Tokenizers: byte level (every UTF-8 byte is one token) and Hugging Face `tokenizer.json` files.

`load_tokenizer(spec)` returns either; both give `encode(text) -> ids`, `decode(ids) -> text`,
`vocab_size`, `eos_id` (None when the tokenizer has no end-of-sequence token) and `spec`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import numpy as np

# Names that mark the end of a document in common tokenizers, tried in this order when the
# tokenizer file's folder holds no tokenizer_config.json naming its `eos_token`.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[EOS]", "<|im_end|>")


class Tokenizer(Protocol):
    """What the data pipelines and generation need from a tokenizer."""

    spec: str
    vocab_size: int
    eos_id: int | None

    def encode(self, text: str) -> Sequence[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """Maps text to its UTF-8 bytes and back; token ids are the byte values 0..255."""

    spec: str = "byte"
    vocab_size: int = 256
    eos_id: int | None = None

    def encode(self, text: str) -> np.ndarray:
        """`text` -> int32 array [len(text.encode("utf-8"))] of byte values."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode` of each text."""
        return [self.encode(t) for t in texts]

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


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer read from a `tokenizer.json` file.

    `encode` adds no special tokens (no BOS/CLS from the file's post-processor): documents are
    separated by `eos_id`, which the data preparation appends. `eos_id` comes from `eos_token`,
    when given, else from a `tokenizer_config.json` beside the file, else from the first of
    `EOS_CANDIDATES` in the vocabulary, else it is None.
    """

    def __init__(self, path: str | Path, *, eos_token: str | None = None):
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError as err:  # pragma: no cover - install dependency
            raise ImportError("Hugging Face tokenizers are read with the `tokenizers` package: "
                              "pip install tokenizers") from err
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises plain Exceptions for malformed files
            raise ValueError(f"tokenizer file {str(path)!r} is not a Hugging Face tokenizer.json: {err}") from err
        self.path = path.resolve()
        self.spec = str(path)
        self.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.eos_token = eos_token if eos_token is not None else _find_eos_token(path, self._tok)
        self.eos_id: int | None = None
        if self.eos_token is not None:
            eos_id = self._tok.token_to_id(self.eos_token)
            if eos_id is None:
                raise ValueError(f"end-of-sequence token {self.eos_token!r} is not in tokenizer {str(path)!r}")
            self.eos_id = int(eos_id)

    def encode(self, text: str) -> list[int]:
        """`text` -> token ids [N] (no special tokens added)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text (in parallel threads inside `tokenizers`)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Token ids [N] -> text (special tokens kept)."""
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, np.ndarray) else ids)]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"decode expects ids in 0..{self.vocab_size - 1}, got {bad[0]}")
        return self._tok.decode(ids, skip_special_tokens=False)


def _find_eos_token(path: Path, tok) -> str | None:
    config = path.parent / "tokenizer_config.json"
    if config.is_file():
        try:
            eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
        except (ValueError, AttributeError):
            eos = None
        if isinstance(eos, dict):  # {"content": "</s>", ...} in older files
            eos = eos.get("content")
        if isinstance(eos, str) and tok.token_to_id(eos) is not None:
            return eos
    for name in EOS_CANDIDATES:
        if tok.token_to_id(name) is not None:
            return name
    return None


def load_tokenizer(spec: str, *, eos_token: str | None = None) -> ByteTokenizer | HFTokenizer:
    """`"byte"` -> `ByteTokenizer()`; a path to a Hugging Face `tokenizer.json` -> `HFTokenizer`.

    `eos_token` names the end-of-sequence token of a Hugging Face tokenizer (see `HFTokenizer`).
    Raises FileNotFoundError / ValueError naming the spec when it is neither.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"tokenizer spec must be 'byte' or a path to a tokenizer.json, got {spec!r}")
    if spec == "byte":
        if eos_token is not None:
            raise ValueError("the byte tokenizer has no end-of-sequence token; eos_token must be None")
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "tokenizer.json").is_file():
        path = path / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"tokenizer {spec!r} is neither 'byte' nor an existing tokenizer.json file")
    return HFTokenizer(path, eos_token=eos_token)
