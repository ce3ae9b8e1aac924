"""grain pipelines over prepared ArrayRecord shards: documents packed into fixed-length rows.

Each document d (its token ids, end-of-sequence token included) becomes the example
`inputs = d[:-1]`, `targets = d[1:]`: every target is the next token of the same document, so no
target crosses a document boundary. Examples are concatenated and split into rows of `seq_len`
(grain's ConcatThenSplit); a document longer than the room left in a row continues in the next
row as a new segment. `segment_ids` [B, T] numbers the pieces of each row 1..n (0 = padding,
whose targets are -1); the model restarts the DeltaNet state and masks attention at every
segment start.
"""

from __future__ import annotations

from typing import Sequence

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset

from deltanet_jax.data.pipeline import worker_prefetch
from deltanet_jax.data.token_records import decode_record

Batch = dict[str, np.ndarray]


class DocumentToExample:
    """Record bytes -> {"inputs": d[:-1], "targets": d[1:]} int32 of one document d."""

    def __init__(self, dtype: str):
        self.dtype = dtype

    def __call__(self, record: bytes) -> Batch:
        ids = decode_record(record, self.dtype)
        return {"inputs": ids[:-1], "targets": ids[1:]}


def finish_batch(batch: Batch) -> Batch:
    """Packed batch -> {"inputs", "targets", "segment_ids"} int32 [B, T]; padding targets -1."""
    segment_ids = batch["inputs_segment_ids"].astype(np.int32)
    targets = np.where(segment_ids > 0, batch["targets"], -1).astype(np.int32)
    return {"inputs": batch["inputs"].astype(np.int32), "targets": targets, "segment_ids": segment_ids}


def _pack(ds: grain.IterDataset, seq_len: int) -> grain.IterDataset:
    return ConcatThenSplitIterDataset(ds, length_struct={"inputs": seq_len, "targets": seq_len})


def shard_records(ds: grain.MapDataset, process_index: int, process_count: int) -> grain.MapDataset:
    """Records `process_index`, `process_index + process_count`, ... of `ds`: disjoint, covering."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    if len(ds) < process_count:
        raise ValueError(f"{len(ds)} documents cannot be shared by {process_count} processes")
    return ds[process_index::process_count] if process_count > 1 else ds


def packed_train_iterator(
    paths: Sequence[str], *, dtype: str, seq_len: int, batch_size: int, seed: int, shuffle: bool = True,
    process_index: int = 0, process_count: int = 1, prefetch_threads: int = 0, workers: int = 0,
) -> "PackedIterator":
    """Endless iterator of packed training batches {"inputs", "targets", "segment_ids"} int32
    [batch_size, seq_len] read from ArrayRecord `paths`, with `get_state()` / `set_state()`.

    This process reads the documents `process_index::process_count` (see `shard_records`),
    shuffled by `seed` with a new order every pass over them. `prefetch_threads` threads read
    records ahead; `workers` > 0 packs batches in that many processes (the batches then depend
    on `workers`, deterministically).
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
    if not paths:
        raise ValueError("no training shards to read")
    ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(list(paths)))
    ds = shard_records(ds, process_index, process_count)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat().map(DocumentToExample(dtype))
    read = grain.ReadOptions(num_threads=prefetch_threads, prefetch_buffer_size=2 * prefetch_threads)
    it_ds = _pack(ds.to_iter_dataset(read_options=read), seq_len)
    it_ds = it_ds.batch(batch_size, drop_remainder=True).map(finish_batch)
    if workers > 0:
        it_ds = worker_prefetch(it_ds, workers)
    return PackedIterator(iter(it_ds))


class PackedIterator:
    """A grain iterator whose `set_state` also takes its state back from JSON.

    grain's packing keeps `(start, stop)` tuples in its state and tests them against a tuple; JSON
    returns lists, which would restore the wrong position, so lists there become tuples again.
    """

    def __init__(self, iterator: grain.DatasetIterator):
        self._iterator = iterator

    def __iter__(self) -> "PackedIterator":
        return self

    def __next__(self) -> Batch:
        return next(self._iterator)

    def get_state(self) -> dict:
        return self._iterator.get_state()

    def set_state(self, state: dict) -> None:
        self._iterator.set_state(_slices_as_tuples(state))

    def close(self) -> None:
        """Stop worker processes, if any."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


def _slices_as_tuples(state):
    if isinstance(state, dict):
        return {k: ({f: tuple(v) for f, v in value.items()} if k == "remainder_slices" else _slices_as_tuples(value))
                for k, value in state.items()}
    if isinstance(state, list):
        return [_slices_as_tuples(v) for v in state]
    return state


def packed_validation_batches(
    paths: Sequence[str], *, dtype: str, seq_len: int, batch_size: int, num_batches: int,
) -> list[Batch]:
    """Up to `num_batches` packed batches [batch_size, seq_len] of the validation documents, in
    stored order (no seed). Fewer when the split runs out; the last batch is then padded with
    segment 0 (targets -1). Raises ValueError when the split holds no tokens to predict.
    """
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    if not paths:
        raise ValueError("the dataset has no validation split (prepare it with --val-fraction > 0)")
    ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(list(paths))).map(DocumentToExample(dtype))
    rows: list[Batch] = []
    for row in _pack(ds.to_iter_dataset(), seq_len):
        rows.append(row)
        if len(rows) == num_batches * batch_size:
            break
    rows = [r for r in rows if (r["inputs_segment_ids"] > 0).any()]
    if not rows:
        raise ValueError("the validation split holds no tokens to predict")
    empty = {k: np.zeros_like(v) for k, v in rows[0].items()}
    rows += [empty] * (-len(rows) % batch_size)
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batches.append(finish_batch({k: np.stack([r[k] for r in chunk]) for k in chunk[0]}))
    return batches
