"""On-disk format of a prepared dataset: ArrayRecord shards of tokenized documents.

A dataset directory holds `metadata.json` and shards `train-NNNNN.array_record` /
`validation-NNNNN.array_record`. Each record is one document: its token ids (end-of-sequence
token appended when the tokenizer has one) as little-endian `dtype` bytes. `metadata.json` is
written last, so a directory without it is an unfinished or foreign one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "deltanet-jax-tokens"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
SPLITS = ("train", "validation")
DTYPES = ("uint16", "uint32")


def token_dtype(vocab_size: int) -> str:
    """Smallest stored dtype holding ids 0..vocab_size-1."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.array_record"


def encode_record(ids: Any, dtype: str) -> bytes:
    """Token ids [N] -> record bytes (little-endian `dtype`)."""
    return np.asarray(ids, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()


def decode_record(record: bytes, dtype: str) -> np.ndarray:
    """Record bytes -> int32 token ids [N]."""
    return np.frombuffer(record, dtype=np.dtype(dtype).newbyteorder("<")).astype(np.int32)


class DatasetError(ValueError):
    """A prepared dataset directory is missing, unfinished or inconsistent; the message says how."""


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Read and check `metadata.json` of dataset directory `path` (the shards must exist).

    Returns the metadata dict; its `splits[split]["shards"]` entries gain an absolute `path`.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset directory {str(root)!r} does not exist")
    meta_path = root / METADATA_FILE
    if not meta_path.is_file():
        raise DatasetError(f"{str(root)!r} has no {METADATA_FILE}: not a dataset written by "
                           "experiments.prepare_data, or its preparation did not finish")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DatasetError(f"{str(meta_path)!r} is unreadable or not JSON: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DatasetError(f"{str(meta_path)!r} is not a {FORMAT} metadata file")
    if meta.get("version") != FORMAT_VERSION:
        raise DatasetError(f"{str(meta_path)!r} has format version {meta.get('version')!r}, "
                           f"this library reads version {FORMAT_VERSION}")
    if meta.get("dtype") not in DTYPES:
        raise DatasetError(f"{str(meta_path)!r}: dtype must be one of {DTYPES}, got {meta.get('dtype')!r}")
    splits = meta.get("splits")
    if not isinstance(splits, dict) or set(splits) != set(SPLITS):
        raise DatasetError(f"{str(meta_path)!r}: splits must be {SPLITS}")
    for split in SPLITS:
        for shard in splits[split].get("shards", []):
            shard_path = root / shard["file"]
            if not shard_path.is_file():
                raise DatasetError(f"dataset {str(root)!r} lists shard {shard['file']!r}, which is missing")
            shard["path"] = str(shard_path.resolve())
    return meta
