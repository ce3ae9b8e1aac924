"""The batches a training process feeds: its own rows of every global batch, and of the validation set."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np

from deltanet_jax.data import build_data
from deltanet_jax.train.config import RunConfig

Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class TrainData:
    """`train`: the iterator whose `get_state()` / `set_state()` go into checkpoints; iterating a
    TrainData yields this process's rows of each training batch as NumPy arrays. `validation`: this
    process's rows of the fixed validation batches."""

    train: Any
    validation: list[Batch]
    source: Any  # the `build_data` result (closed by `close`)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return {k: np.asarray(v) for k, v in next(self.train).items()}

    def close(self) -> None:
        self.source.close()


def make_train_data(config: RunConfig, rows: slice) -> TrainData:
    """Training and validation data of `config` for a process holding global batch `rows`.

    `deltanet_jax.data.build_data` reads each process's own shard: processes are counted by their
    distinct row blocks (several processes of one tensor-parallel group share a block and read alike).
    """
    tc = config.train
    local = rows.stop - rows.start
    built = build_data(config.data, seq_len=tc.seq_len, batch_size=local, seed=tc.seed,
                       process_index=rows.start // local, process_count=tc.batch_size // local,
                       eval_batches=tc.eval_batches)
    return TrainData(train=built.train, validation=list(built.validation), source=built)
