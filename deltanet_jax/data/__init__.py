"""Tokenizers, embedded corpora, prepared datasets and grain input pipelines."""

from deltanet_jax.data.build import TrainingData, build_data, check_data, corpus_tokens
from deltanet_jax.data.corpus import EMBEDDED_CORPORA, CorpusSplits, check_corpus, load_corpus, split_tokens
from deltanet_jax.data.packing import packed_train_iterator, packed_validation_batches
from deltanet_jax.data.pipeline import iterator_state, train_dataset, train_iterator, validation_batches
from deltanet_jax.data.token_records import DatasetError, read_metadata
from deltanet_jax.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "EMBEDDED_CORPORA",
    "ByteTokenizer",
    "CorpusSplits",
    "DatasetError",
    "HFTokenizer",
    "Tokenizer",
    "TrainingData",
    "build_data",
    "check_corpus",
    "check_data",
    "corpus_tokens",
    "iterator_state",
    "load_corpus",
    "load_tokenizer",
    "packed_train_iterator",
    "packed_validation_batches",
    "read_metadata",
    "split_tokens",
    "train_dataset",
    "train_iterator",
    "validation_batches",
]
