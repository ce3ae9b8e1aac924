"""The batches a training process feeds: its own rows of every global batch, and of the validation set."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np

from deltanet_jax.train.config import RunConfig

Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class TrainData:
    """`train`: the iterator whose `get_state()` / `set_state()` go into checkpoints; iterating a
    TrainData yields this process's rows of each training batch. `validation`: this process's rows of
    the fixed validation batches."""

    train: Any
    validation: list[Batch]
    rows: slice | None  # rows to cut from each `train` batch (None: the iterator yields only ours)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batch = next(self.train)
        if self.rows is None:
            return {k: np.asarray(v) for k, v in batch.items()}
        return {k: np.asarray(v)[self.rows] for k, v in batch.items()}


def make_train_data(config: RunConfig, rows: slice) -> TrainData:
    """Training and validation data of `config` for a process holding global batch `rows`.

    Built by `deltanet_jax.data.build_data` when the data package has it (each process reading its
    own shard: process_index / process_count count the distinct row blocks), else from the embedded
    or text corpus, where every process draws the same global batches and keeps its rows.
    """
    from deltanet_jax import data as data_pkg

    tc = config.train
    local = rows.stop - rows.start
    if hasattr(data_pkg, "build_data"):
        built = data_pkg.build_data(config.data, seq_len=tc.seq_len, batch_size=local, seed=tc.seed,
                                    process_index=rows.start // local, process_count=tc.batch_size // local)
        return TrainData(train=built.train, validation=list(built.validation), rows=None)
    splits = data_pkg.load_corpus(config.data.corpus)
    train = data_pkg.train_iterator(splits.train, seq_len=tc.seq_len, batch_size=tc.batch_size, seed=tc.seed,
                                    prefetch_threads=config.data.prefetch_threads)
    val = data_pkg.validation_batches(splits.validation, seq_len=tc.seq_len, batch_size=tc.batch_size,
                                      num_batches=tc.eval_batches)
    whole = local == tc.batch_size
    return TrainData(train=train, validation=[b if whole else {k: v[rows] for k, v in b.items()} for b in val],
                     rows=None if whole else rows)
