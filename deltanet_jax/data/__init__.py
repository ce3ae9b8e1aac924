"""Tokenizer, embedded corpora and grain input pipelines."""

from deltanet_jax.data.corpus import EMBEDDED_CORPORA, CorpusSplits, check_corpus, load_corpus, split_tokens
from deltanet_jax.data.pipeline import iterator_state, train_dataset, train_iterator, validation_batches
from deltanet_jax.data.tokenizer import ByteTokenizer

__all__ = [
    "EMBEDDED_CORPORA",
    "ByteTokenizer",
    "CorpusSplits",
    "check_corpus",
    "iterator_state",
    "load_corpus",
    "split_tokens",
    "train_dataset",
    "train_iterator",
    "validation_batches",
]
