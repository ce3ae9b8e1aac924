"""grain pipelines over a token array: shuffled training windows and fixed validation windows.

A window is `seq_len + 1` consecutive tokens; `inputs` are its first `seq_len`, `targets` its last
`seq_len` (next-token prediction). Batches are dicts of int32 arrays [batch_size, seq_len].
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

Batch = dict[str, np.ndarray]


def _check_window(tokens: np.ndarray, seq_len: int, batch_size: int, what: str) -> None:
    if tokens.ndim != 1:
        raise ValueError(f"{what} tokens must be 1-D, got shape {tokens.shape}")
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
    if len(tokens) < seq_len + 1:
        raise ValueError(f"{what} split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")


def _window_to_example(window: np.ndarray) -> Batch:
    return {"inputs": window[:-1], "targets": window[1:]}


def train_dataset(tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int) -> grain.MapDataset:
    """Infinite MapDataset of training batches; element `i` is the batch of step `i`.

    Every start offset of the split is one example; the offsets are shuffled by `seed` (a new
    order each pass over the data), so batches are random windows, the same for the same seed.
    """
    _check_window(tokens, seq_len, batch_size, "training")
    tokens = np.ascontiguousarray(tokens, dtype=np.int32)
    num_windows = len(tokens) - seq_len
    return (
        grain.MapDataset.range(num_windows)
        .shuffle(seed=seed)
        .repeat()
        .map(lambda start: _window_to_example(tokens[start : start + seq_len + 1]))
        .batch(batch_size, drop_remainder=True)
    )


def train_iterator(
    tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int, prefetch_threads: int = 0
) -> grain.DatasetIterator:
    """Iterator over `train_dataset` batches with `get_state()` / `set_state()` for checkpoints.

    `prefetch_threads` > 0 prepares batches in background threads (same batches, same order).
    """
    ds = train_dataset(tokens, seq_len=seq_len, batch_size=batch_size, seed=seed)
    read = grain.ReadOptions(num_threads=prefetch_threads, prefetch_buffer_size=2 * prefetch_threads)
    return iter(ds.to_iter_dataset(read_options=read))


def validation_batches(tokens: np.ndarray, *, seq_len: int, batch_size: int, num_batches: int) -> list[Batch]:
    """A fixed list of `num_batches` batches: windows at evenly spaced offsets over the split.

    Independent of any seed, so validation losses of different runs compare directly. When the split
    holds fewer windows than asked for, windows overlap.
    """
    _check_window(tokens, seq_len, batch_size, "validation")
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    tokens = np.asarray(tokens, dtype=np.int32)
    count = num_batches * batch_size
    starts = np.linspace(0, len(tokens) - seq_len - 1, count).round().astype(np.int64)
    windows = np.stack([tokens[s : s + seq_len + 1] for s in starts]).reshape(num_batches, batch_size, -1)
    return [{"inputs": w[:, :-1].copy(), "targets": w[:, 1:].copy()} for w in windows]


def iterator_state(iterator: grain.DatasetIterator) -> dict[str, Any]:
    """JSON-serialisable position of a training iterator."""
    return dict(iterator.get_state())
