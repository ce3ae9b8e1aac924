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
    tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int, prefetch_threads: int = 0,
    workers: int = 0, process_index: int = 0, process_count: int = 1,
) -> grain.DatasetIterator:
    """Iterator over `train_dataset` batches with `get_state()` / `set_state()` for checkpoints.

    `prefetch_threads` > 0 prepares batches in background threads and `workers` > 0 in that many
    processes (same batches, same order either way). With `process_count` > 1 each batch is this
    process's rows `[p * b, (p + 1) * b)` of the global batch, b = batch_size / process_count, so
    any number of processes together train on the same global batches.
    """
    ds = train_dataset(tokens, seq_len=seq_len, batch_size=batch_size, seed=seed)
    if process_count > 1:
        ds = ds.map(ProcessRows(process_index, process_count, batch_size))
    read = grain.ReadOptions(num_threads=prefetch_threads, prefetch_buffer_size=2 * prefetch_threads)
    it_ds = ds.to_iter_dataset(read_options=read)
    if workers > 0:
        it_ds = worker_prefetch(it_ds, workers)
    return iter(it_ds)


def worker_prefetch(ds: grain.IterDataset, workers: int) -> grain.IterDataset:
    """`ds` prepared ahead in `workers` processes (grain's mp_prefetch; each takes a slice)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app use defaults
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))


class ProcessRows:
    """Global batch dict [B, ...] -> rows `[p * B/P, (p + 1) * B/P)` of process p of P."""

    def __init__(self, process_index: int, process_count: int, batch_size: int):
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
        if batch_size % process_count:
            raise ValueError(f"batch size {batch_size} is not divisible by the {process_count} processes")
        local = batch_size // process_count
        self.rows = slice(process_index * local, (process_index + 1) * local)

    def __call__(self, batch: Batch) -> Batch:
        return {k: v[self.rows] for k, v in batch.items()}


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
