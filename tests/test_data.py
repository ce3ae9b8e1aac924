"""Byte tokenizer, the embedded corpus and its split, grain pipelines."""

import hashlib
import importlib.resources

import numpy as np
import pytest

from deltanet_jax.data import (
    ByteTokenizer,
    check_corpus,
    load_corpus,
    train_dataset,
    train_iterator,
    validation_batches,
)

CORPUS_MD5 = "6fb458f1232090904fb40fe944165e91"


def test_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "First Citizen:\nBefore we proceed — any further, héé? ✓"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert len(ids) == len(text.encode("utf-8")) and ids.max() < tok.vocab_size == 256
    assert tok.decode(ids) == text
    assert tok.decode(list(ids)) == text
    assert tok.encode("").shape == (0,)


def test_tokenizer_decode_invalid_bytes_replaced_and_bad_ids_rejected():
    tok = ByteTokenizer()
    assert tok.decode(np.array([104, 105, 0xFF], np.int32)) == "hi\ufffd"
    with pytest.raises(ValueError, match="0..255"):
        tok.decode([300])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


def test_embedded_corpus_md5_and_split_sizes():
    raw = importlib.resources.files("deltanet_jax.data").joinpath("corpus", "tinyshakespeare.txt").read_bytes()
    assert hashlib.md5(raw).hexdigest() == CORPUS_MD5
    splits = load_corpus("tinyshakespeare")
    assert len(raw) == 1_115_394
    assert len(splits.train) == int(len(raw) * 0.9) == 1_003_854
    assert len(splits.validation) == 111_540
    joined = np.concatenate([splits.train, splits.validation]).astype(np.uint8).tobytes()
    assert joined == raw
    assert splits.train.dtype == np.int32


def test_corpus_from_file_and_missing(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("abcdefghij" * 10)
    splits = load_corpus(str(path))
    assert (len(splits.train), len(splits.validation)) == (90, 10)
    check_corpus(str(path))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        check_corpus(str(tmp_path / "nope.txt"))


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_train_batches_shapes_shift_and_determinism():
    tokens = np.arange(1000, dtype=np.int32)  # token value = position: windows are easy to check
    a = _take(train_iterator(tokens, seq_len=8, batch_size=4, seed=1), 5)
    b = _take(train_iterator(tokens, seq_len=8, batch_size=4, seed=1), 5)
    c = _take(train_iterator(tokens, seq_len=8, batch_size=4, seed=2), 5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["targets"], y["targets"])
    assert any(not np.array_equal(x["inputs"], z["inputs"]) for x, z in zip(a, c))
    for batch in a:
        assert batch["inputs"].shape == batch["targets"].shape == (4, 8)
        assert batch["inputs"].dtype == np.int32
        np.testing.assert_array_equal(batch["targets"], batch["inputs"] + 1)  # next token
        np.testing.assert_array_equal(np.diff(batch["inputs"], axis=1), 1)  # contiguous windows
    starts = np.concatenate([batch["inputs"][:, 0] for batch in a])
    assert len(set(starts.tolist())) == len(starts)  # shuffled offsets, no repeats within an epoch


def test_train_dataset_indexable_by_step():
    tokens = np.arange(500, dtype=np.int32)
    ds = train_dataset(tokens, seq_len=6, batch_size=3, seed=0)
    it = train_iterator(tokens, seq_len=6, batch_size=3, seed=0)
    for step, batch in enumerate(_take(it, 4)):
        np.testing.assert_array_equal(ds[step]["inputs"], batch["inputs"])


def test_iterator_state_resumes_exactly():
    tokens = np.arange(2000, dtype=np.int32)
    it = train_iterator(tokens, seq_len=16, batch_size=2, seed=3)
    _take(it, 7)
    state = it.get_state()
    expected = _take(it, 3)
    fresh = train_iterator(tokens, seq_len=16, batch_size=2, seed=3)
    fresh.set_state(state)
    for x, y in zip(expected, _take(fresh, 3)):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])


def test_validation_batches_fixed_and_covering():
    tokens = np.arange(1000, dtype=np.int32)
    a = validation_batches(tokens, seq_len=10, batch_size=4, num_batches=3)
    b = validation_batches(tokens, seq_len=10, batch_size=4, num_batches=3)
    assert len(a) == 3
    for x, y in zip(a, b):
        assert x["inputs"].shape == (4, 10) and x["inputs"].dtype == np.int32
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["targets"], x["inputs"] + 1)
    assert a[0]["inputs"][0, 0] == 0 and a[-1]["targets"][-1, -1] == 999  # spans the whole split


def test_pipeline_rejects_too_short_split():
    with pytest.raises(ValueError, match="fewer than seq_len"):
        train_iterator(np.arange(5, dtype=np.int32), seq_len=8, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="validation split"):
        validation_batches(np.arange(5, dtype=np.int32), seq_len=8, batch_size=2, num_batches=1)
