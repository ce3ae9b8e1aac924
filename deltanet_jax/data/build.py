"""One entry point from a run's `data` config section to its batches: `build_data`.

Two sources: a text corpus (`data.path` empty; `data.corpus` names the embedded corpus or a UTF-8
file, tokenized whole and split 90/10 into random training windows and fixed validation windows)
and a dataset prepared by `experiments.prepare_data` (`data.path`; packed documents, see
`deltanet_jax.data.packing`).

`batch_size` is the rows of this process (process p of P; the global batch is batch_size * P). For
a corpus every process builds the same global batch and keeps its rows p * batch_size ... (so any
process count trains on the same data); a prepared dataset gives each process its own documents.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from deltanet_jax.data.corpus import check_corpus, corpus_bytes, load_corpus, split_tokens
from deltanet_jax.data.packing import packed_train_iterator, packed_validation_batches
from deltanet_jax.data.pipeline import Batch, ProcessRows, train_iterator, validation_batches
from deltanet_jax.data.token_records import DatasetError, read_metadata
from deltanet_jax.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer


@dataclasses.dataclass
class TrainingData:
    """What a run trains and validates on.

    train: endless iterator of dicts of int32 [batch_size, seq_len] arrays (this process's rows):
      "inputs", "targets" (-1 = no target) and, for prepared datasets, "segment_ids"
      (1..n per row, 0 = padding); `get_state()` / `set_state()` for checkpoints.
    validation: fixed list of batches of the same form (this process's rows).
    tokenizer: the tokenizer the tokens come from.
    packed: whether batches carry "segment_ids".
    """

    train: grain.DatasetIterator
    validation: list[Batch]
    tokenizer: Any
    packed: bool

    def close(self) -> None:
        """Stop the worker processes of `train` (data.workers > 0); nothing otherwise."""
        close = getattr(self.train, "close", None)
        if close is not None:
            close()


def check_data(data_config: Any, *, vocab_size: int | None = None) -> Any:
    """Cheap checks of a `DataConfig` against the files it names; returns its tokenizer.

    Raises FileNotFoundError / ValueError naming the problem: a missing corpus, tokenizer or
    dataset, a dataset prepared with another tokenizer, or (given the model's `vocab_size`) a
    tokenizer whose ids do not fit the model's vocabulary. Reads no tokens.
    """
    tokenizer = load_tokenizer(data_config.tokenizer)
    if data_config.path:
        meta = read_metadata(data_config.path)
        _check_same_tokenizer(tokenizer, meta, data_config)
    else:
        check_corpus(data_config.corpus)
    if vocab_size is not None and vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model.vocab_size ({vocab_size}) is smaller than the vocabulary of tokenizer "
                         f"{data_config.tokenizer!r} ({tokenizer.vocab_size})")
    return tokenizer


def _check_same_tokenizer(tokenizer: Any, meta: dict[str, Any], data_config: Any) -> None:
    stored = meta.get("tokenizer", {})
    if isinstance(tokenizer, ByteTokenizer):
        same = stored.get("spec") == "byte"
    else:
        assert isinstance(tokenizer, HFTokenizer)
        same = stored.get("sha256") == tokenizer.sha256
    if not same:
        raise DatasetError(
            f"dataset {data_config.path!r} was tokenized with {stored.get('spec')!r} "
            f"(sha256 {stored.get('sha256')}), but data.tokenizer is {data_config.tokenizer!r}; "
            "set data.tokenizer to the tokenizer the dataset was prepared with"
        )
    if stored.get("vocab_size") != tokenizer.vocab_size:
        raise DatasetError(f"dataset {data_config.path!r} records vocab_size {stored.get('vocab_size')}, "
                           f"tokenizer {data_config.tokenizer!r} has {tokenizer.vocab_size}")


def corpus_tokens(corpus: str, tokenizer: Any) -> np.ndarray:
    """Token ids [N] int32 of a corpus: `load_corpus`'s bytes, or the text encoded by `tokenizer`."""
    if isinstance(tokenizer, ByteTokenizer):
        splits = load_corpus(corpus)
        return np.concatenate([splits.train, splits.validation])
    text = corpus_bytes(corpus).decode("utf-8", errors="replace")
    tokens = np.asarray(tokenizer.encode(text), dtype=np.int32)
    if tokens.size == 0:
        raise ValueError(f"corpus {corpus!r} is empty")
    return tokens


def build_data(
    data_config: Any, *, seq_len: int, batch_size: int, seed: int, process_index: int = 0,
    process_count: int = 1, eval_batches: int = 16,
) -> TrainingData:
    """Training iterator, validation batches and tokenizer for `data_config` (a `DataConfig`).

    `batch_size` is this process's rows of each batch; the global batch is `batch_size *
    process_count` and process `process_index` holds its rows `[process_index * batch_size, ...)`.
    `eval_batches` is the number of validation batches. With the default config this gives exactly
    the batches of `train_iterator(load_corpus(corpus).train, ...)` and
    `validation_batches(...validation, ..., num_batches=eval_batches)`.
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    global_batch = batch_size * process_count
    tokenizer = check_data(data_config)
    dc = data_config
    if not dc.path:
        if isinstance(tokenizer, ByteTokenizer):
            splits = load_corpus(dc.corpus)
        else:
            splits = split_tokens(corpus_tokens(dc.corpus, tokenizer))
        train = train_iterator(
            splits.train, seq_len=seq_len, batch_size=global_batch, seed=seed, prefetch_threads=dc.prefetch_threads,
            workers=dc.workers, process_index=process_index, process_count=process_count,
        )
        val = validation_batches(splits.validation, seq_len=seq_len, batch_size=global_batch,
                                 num_batches=eval_batches)
        if process_count > 1:
            rows = ProcessRows(process_index, process_count, global_batch)
            val = [rows(b) for b in val]
        return TrainingData(train=train, validation=val, tokenizer=tokenizer, packed=False)

    meta = read_metadata(dc.path)
    shards = {split: [s["path"] for s in meta["splits"][split]["shards"]] for split in ("train", "validation")}
    if not shards["train"]:
        raise DatasetError(f"dataset {dc.path!r} has no training documents")
    if not shards["validation"]:
        raise DatasetError(f"dataset {dc.path!r} has no validation split: prepare it with --val-fraction > 0")
    train = packed_train_iterator(
        shards["train"], dtype=meta["dtype"], seq_len=seq_len, batch_size=batch_size, seed=seed, shuffle=dc.shuffle,
        process_index=process_index, process_count=process_count, prefetch_threads=dc.prefetch_threads,
        workers=dc.workers,
    )
    val = packed_validation_batches(
        shards["validation"], dtype=meta["dtype"], seq_len=seq_len, batch_size=global_batch, num_batches=eval_batches
    )
    if process_count > 1:
        rows = ProcessRows(process_index, process_count, global_batch)
        val = [rows(b) for b in val]
    return TrainingData(train=train, validation=val, tokenizer=tokenizer, packed=True)

