"""Text corpora: the embedded tiny-shakespeare and user text files, tokenized to bytes.

Splits follow nanoGPT: the first 90% of the tokens train, the last 10% validate.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from pathlib import Path
from typing import NamedTuple

import numpy as np

from deltanet_jax.data.tokenizer import ByteTokenizer

# Embedded corpora shipped as package data: name -> (file name, md5 of its bytes).
EMBEDDED_CORPORA: dict[str, tuple[str, str]] = {
    "tinyshakespeare": ("tinyshakespeare.txt", "6fb458f1232090904fb40fe944165e91"),
}
TRAIN_FRACTION = 0.9


class CorpusSplits(NamedTuple):
    """Token arrays of the two splits: train [N_train] int32, validation [N_val] int32."""

    train: np.ndarray
    validation: np.ndarray


def corpus_bytes(name_or_path: str) -> bytes:
    """Raw bytes of an embedded corpus (by name) or of a UTF-8 text file (by path).

    Embedded corpora are checked against their md5 so a damaged install is caught early.
    """
    if name_or_path in EMBEDDED_CORPORA:
        file_name, md5 = EMBEDDED_CORPORA[name_or_path]
        data = importlib.resources.files("deltanet_jax.data").joinpath("corpus", file_name).read_bytes()
        digest = hashlib.md5(data).hexdigest()
        if digest != md5:
            raise ValueError(f"embedded corpus {name_or_path!r} is damaged: md5 {digest}, expected {md5}")
        return data
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        names = ", ".join(sorted(EMBEDDED_CORPORA))
        raise FileNotFoundError(f"corpus {name_or_path!r} is neither an embedded corpus ({names}) nor a file")
    return path.read_bytes()


def check_corpus(name_or_path: str) -> None:
    """Raise if `name_or_path` names no embedded corpus and no readable file (cheap, reads nothing)."""
    if name_or_path in EMBEDDED_CORPORA:
        return
    if not Path(name_or_path).expanduser().is_file():
        names = ", ".join(sorted(EMBEDDED_CORPORA))
        raise FileNotFoundError(f"corpus {name_or_path!r} is neither an embedded corpus ({names}) nor a file")


def split_tokens(tokens: np.ndarray, train_fraction: float = TRAIN_FRACTION) -> CorpusSplits:
    """Tokens [N] -> first `int(N * train_fraction)` for training, the rest for validation."""
    n_train = int(len(tokens) * train_fraction)
    return CorpusSplits(train=tokens[:n_train], validation=tokens[n_train:])


def load_corpus(name_or_path: str = "tinyshakespeare") -> CorpusSplits:
    """Byte tokens of a corpus, split 90% train / 10% validation (in order, as nanoGPT does)."""
    data = corpus_bytes(name_or_path)
    tokens = np.frombuffer(data, dtype=np.uint8).astype(np.int32)
    if tokens.size == 0:
        raise ValueError(f"corpus {name_or_path!r} is empty")
    assert ByteTokenizer.vocab_size == 256  # byte values index the vocabulary directly
    return split_tokens(tokens)
