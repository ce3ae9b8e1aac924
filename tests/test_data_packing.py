"""Prepared datasets in training: packing with segment ids, shuffling, per-process shards, exact
resume, prefetching workers, validation batches, and build_data over both sources."""

import json

import grain
import numpy as np
import pytest

from deltanet_jax.data import (
    DatasetError, build_data, check_data, load_corpus, packed_train_iterator, packed_validation_batches,
    read_metadata, train_iterator, validation_batches,
)
from deltanet_jax.data.packing import shard_records
from deltanet_jax.data.prepare import prepare_dataset
from deltanet_jax.train.config import ConfigError, DataConfig, RunConfig

# Document i is the letter chr(65 + i) repeated: every byte token names its document.
LENGTHS = [3, 9, 2, 14, 5, 30, 4, 7, 2, 11, 6, 8]


def _dataset(tmp_path, lengths=LENGTHS, val=("zzzzzzzzzz", "yy")):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": chr(65 + i) * n}) + "\n"
                                                  for i, n in enumerate(lengths)))
    out = tmp_path / "ds"
    meta = prepare_dataset(str(tmp_path / "train.jsonl"), out, tokenizer="byte", val_fraction=0.0, progress=False)
    if val:  # a hand-made validation split: the shard of a second preparation, listed in the metadata
        (tmp_path / "val.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in val))
        v = prepare_dataset(str(tmp_path / "val.jsonl"), tmp_path / "v", tokenizer="byte", val_fraction=0.0,
                            progress=False)
        (tmp_path / "v" / "train-00000.array_record").rename(out / "validation-00000.array_record")
        meta["splits"]["validation"] = {**v["splits"]["train"], "shards": [
            {**v["splits"]["train"]["shards"][0], "file": "validation-00000.array_record"}]}
        (out / "metadata.json").write_text(json.dumps(meta))
    return out, [s["path"] for s in read_metadata(out)["splits"]["train"]["shards"]]


def _take(it, n):
    return [next(it) for _ in range(n)]


def _pieces(batches):
    """(document letter index, inputs, targets) of every segment, in stream order."""
    out = []
    for b in batches:
        for row in range(b["inputs"].shape[0]):
            seg = b["segment_ids"][row]
            for s in range(1, seg.max() + 1):
                mask = seg == s
                out.append((b["inputs"][row][mask], b["targets"][row][mask]))
            assert (b["targets"][row][seg == 0] == -1).all()
    return out


def test_packing_segments_reset_at_documents_and_targets_stay_inside(tmp_path):
    _, paths = _dataset(tmp_path)
    it = packed_train_iterator(paths, dtype="uint16", seq_len=8, batch_size=2, seed=0, shuffle=False)
    batches = _take(it, 9)  # 144 slots > 112 targets in one pass
    for b in batches:
        assert set(b) == {"inputs", "targets", "segment_ids"}
        assert all(v.shape == (2, 8) and v.dtype == np.int32 for v in b.values())
        seg = b["segment_ids"]
        assert (seg[:, 0] == 1).all() and (np.diff(seg, axis=1) >= 0).all()  # 1..n per row
        assert ((np.diff(seg, axis=1) == 0) | (np.diff(seg, axis=1) == 1)).all()
    pieces = _pieces(batches)
    for inputs, targets in pieces:
        # A segment holds one document: all its inputs and targets are that document's letter.
        assert len(set(inputs.tolist())) == 1 and (targets == inputs).all()
    # In stream order the pieces rebuild each document's (d[:-1], d[1:]) exactly once per pass.
    letters = [int(p[0][0]) - 65 for p in pieces]
    sizes = {}
    for letter, (inputs, _) in zip(letters, pieces):
        if letter in sizes and sizes[letter] == LENGTHS[letter] - 1:
            break
        sizes[letter] = sizes.get(letter, 0) + len(inputs)
    assert sizes == {i: n - 1 for i, n in enumerate(LENGTHS)}
    order = [x for i, x in enumerate(letters) if i == 0 or x != letters[i - 1]]  # a split document counts once
    assert order[: len(LENGTHS)] == list(range(len(LENGTHS)))  # unshuffled: stored order


def test_segments_on_real_token_ids_and_long_document_split(tmp_path):
    """A document longer than a row continues in the next row as a new segment."""
    _, paths = _dataset(tmp_path, lengths=[20], val=())
    b = next(packed_train_iterator(paths, dtype="uint16", seq_len=8, batch_size=3, seed=0, shuffle=False))
    np.testing.assert_array_equal(b["segment_ids"], [[1] * 8, [1] * 8, [1, 1, 1, 2, 2, 2, 2, 2]])
    assert (b["inputs"] == 65).all() and (b["targets"] == 65).all()


def test_shuffle_changes_order_per_seed_and_epoch(tmp_path):
    _, paths = _dataset(tmp_path)
    first = lambda seed: [int(p[0][0]) for p in _pieces(_take(  # noqa: E731
        packed_train_iterator(paths, dtype="uint16", seq_len=16, batch_size=2, seed=seed), 8))]
    assert first(1) == first(1) and first(1) != first(2)
    assert sorted(set(first(1))) == list(range(65, 65 + len(LENGTHS)))


def test_process_shards_disjoint_and_covering(tmp_path):
    _, paths = _dataset(tmp_path)
    src = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths))
    for count in (1, 2, 3, 5):
        parts = [list(shard_records(src, p, count)) for p in range(count)]
        flat = [r for part in parts for r in part]
        assert len(flat) == len(src) and sorted(flat) == sorted(src[i] for i in range(len(src)))
    seen = []
    for p in range(3):
        it = packed_train_iterator(paths, dtype="uint16", seq_len=8, batch_size=2, seed=5, process_index=p,
                                   process_count=3)
        seen.append({int(x[0][0]) - 65 for x in _pieces(_take(it, 12))})
    assert seen == [set(range(p, len(LENGTHS), 3)) for p in range(3)]
    with pytest.raises(ValueError, match="cannot be shared by 20 processes"):
        shard_records(src, 0, 20)


@pytest.mark.parametrize("workers", [0, 2])
def test_iterator_state_round_trip(tmp_path, workers):
    _, paths = _dataset(tmp_path)
    make = lambda: packed_train_iterator(paths, dtype="uint16", seq_len=8, batch_size=2, seed=3,  # noqa: E731
                                         workers=workers, prefetch_threads=1)
    it, fresh = make(), make()
    _take(it, 3)  # the state is taken mid-document
    state = json.loads(json.dumps(it.get_state()))  # checkpoints keep it as JSON
    expected = _take(it, 8)
    fresh.set_state(state)
    for x, y in zip(expected, _take(fresh, 8)):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    if workers:  # per-worker packing: the same documents, each piece inside one document
        assert {int(p[0][0]) for p in _pieces(expected)} == set(range(65, 65 + len(LENGTHS)))
        assert all(len(set(x.tolist())) == 1 for x, _ in _pieces(expected))
        it.close()
        fresh.close()


def test_state_from_json_resumes_at_every_position(tmp_path):
    """Positions between documents included (grain's packing state holds tuples; JSON gives lists)."""
    _, paths = _dataset(tmp_path)
    make = lambda: packed_train_iterator(paths, dtype="uint16", seq_len=8, batch_size=1, seed=0)  # noqa: E731
    it = make()
    for _ in range(30):
        state = json.loads(json.dumps(it.get_state()))
        expected = _take(it, 2)
        fresh = make()
        fresh.set_state(state)
        for x, y in zip(expected, _take(fresh, 2)):
            np.testing.assert_array_equal(x["inputs"], y["inputs"])
            np.testing.assert_array_equal(x["segment_ids"], y["segment_ids"])
        it = make()
        it.set_state(state)
        next(it)


def test_validation_batches_padded_and_fixed(tmp_path):
    out, _ = _dataset(tmp_path)
    paths = [s["path"] for s in read_metadata(out)["splits"]["validation"]["shards"]]
    a = packed_validation_batches(paths, dtype="uint16", seq_len=4, batch_size=2, num_batches=10)
    assert a[0]["inputs"].shape == (2, 4)
    # "zzzzzzzzzz" -> 9 targets, "yy" -> 1: 10 targets in 3 rows of 4, padded to 2 batches.
    assert len(a) == 2 and sum(int((b["targets"] >= 0).sum()) for b in a) == 10
    np.testing.assert_array_equal(a[1]["segment_ids"], [[1, 2, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(a[1]["targets"], [[ord("z"), ord("y"), -1, -1], [-1] * 4])
    b = packed_validation_batches(paths, dtype="uint16", seq_len=4, batch_size=2, num_batches=1)
    assert len(b) == 1
    np.testing.assert_array_equal(b[0]["inputs"], a[0]["inputs"])


def test_build_data_default_is_the_corpus_path():
    data = build_data(DataConfig(), seq_len=32, batch_size=4, seed=7, eval_batches=2)
    splits = load_corpus("tinyshakespeare")
    ref = train_iterator(splits.train, seq_len=32, batch_size=4, seed=7)
    for x, y in zip(_take(data.train, 3), _take(ref, 3)):
        assert set(x) == {"inputs", "targets"}
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["targets"], y["targets"])
    assert data.train.get_state() == ref.get_state() and not data.packed
    for x, y in zip(data.validation, validation_batches(splits.validation, seq_len=32, batch_size=4, num_batches=2)):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
    assert data.tokenizer.vocab_size == 256
    # Two processes: their rows together are the one-process batch.
    parts = [build_data(DataConfig(), seq_len=32, batch_size=2, seed=7, eval_batches=2, process_index=p,
                        process_count=2) for p in (0, 1)]  # two rows each of the same global batch
    ref = train_iterator(splits.train, seq_len=32, batch_size=4, seed=7)
    for _ in range(2):
        whole = next(ref)
        np.testing.assert_array_equal(np.concatenate([next(p.train)["inputs"] for p in parts]), whole["inputs"])
    np.testing.assert_array_equal(np.concatenate([p.validation[1]["targets"] for p in parts]),
                                  data.validation[1]["targets"])


def test_build_data_prepared_dataset_and_its_checks(tmp_path):
    out, _ = _dataset(tmp_path)
    config = DataConfig(path=str(out))
    data = build_data(config, seq_len=8, batch_size=2, seed=0, eval_batches=3, process_index=1, process_count=2)
    batch = next(data.train)
    assert data.packed and batch["segment_ids"].shape == (2, 8) and len(data.validation) == 1
    assert data.validation[0]["inputs"].shape == (2, 8)
    whole = build_data(config, seq_len=8, batch_size=4, seed=0, eval_batches=3).validation
    np.testing.assert_array_equal(data.validation[0]["inputs"], whole[0]["inputs"][2:])  # rows 2..3 of 4
    with pytest.raises(ValueError, match=r"process_index must be in \[0, 2\)"):
        build_data(config, seq_len=8, batch_size=4, seed=0, process_index=2, process_count=2)
    with pytest.raises(DatasetError, match="does not exist"):
        build_data(DataConfig(path=str(tmp_path / "nowhere")), seq_len=8, batch_size=4, seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="has no metadata.json"):
        check_data(DataConfig(path=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match=r"model.vocab_size \(100\) is smaller"):
        check_data(config, vocab_size=100)
    tok = tmp_path / "tok.json"
    tokenizers = pytest.importorskip("tokenizers")
    tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")).save(str(tok))
    with pytest.raises(DatasetError, match="was tokenized with 'byte'"):
        check_data(DataConfig(path=str(out), tokenizer=str(tok)))
    (out / "validation-00000.array_record").unlink()
    with pytest.raises(DatasetError, match="shard 'validation-00000.array_record', which is missing"):
        check_data(config)


def test_dataset_without_validation_split_is_refused(tmp_path):
    out, _ = _dataset(tmp_path, val=())
    with pytest.raises(DatasetError, match="no validation split"):
        build_data(DataConfig(path=str(out)), seq_len=8, batch_size=2, seed=0)


def test_data_config_fields_and_checks():
    config = RunConfig.from_dict({"data": {"path": "/x", "tokenizer": "t.json", "workers": 2, "shuffle": False}})
    assert config.data.path == "/x" and config.to_dict()["data"]["workers"] == 2
    assert DataConfig().tokenizer == "byte" and DataConfig().path == "" and DataConfig().workers == 0
    for bad, match in [({"workers": -1}, "data.workers"), ({"tokenizer": ""}, "data.tokenizer"),
                       ({"shuffle": "yes"}, "data.shuffle"), ({"path": 3}, "data.path")]:
        with pytest.raises(ConfigError, match=match):
            RunConfig.from_dict({"data": bad})


def test_packed_rows_give_each_document_its_own_logits(tmp_path):
    """Through the model, a segment of a packed row computes what its document alone would."""
    import jax.numpy as jnp
    from flax import nnx

    from deltanet_jax.model import DeltaNetConfig, DeltaNetForCausalLM

    texts = ["the cat sat", "on a mat, then", "ran", "dogs bark at the moon"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prepare_dataset(str(tmp_path / "d.jsonl"), tmp_path / "ds", tokenizer="byte", val_fraction=0.0, progress=False)
    paths = [s["path"] for s in read_metadata(tmp_path / "ds")["splits"]["train"]["shards"]]
    batch = next(packed_train_iterator(paths, dtype="uint16", seq_len=16, batch_size=2, seed=0, shuffle=False))
    config = DeltaNetConfig.from_dict({"hidden_size": 32, "num_hidden_layers": 1, "num_heads": 2, "vocab_size": 256})
    model = DeltaNetForCausalLM(config, rngs=nnx.Rngs(0))
    forward = nnx.jit(lambda m, ids, seg: m(ids, segment_ids=seg))
    # Every segment alone at the start of its own row (zeros after it are padding, segment 0).
    pieces = [(row, s) for row in range(2) for s in range(1, batch["segment_ids"][row].max() + 1)]
    alone_ids = np.zeros((len(pieces), 16), np.int32)
    alone_seg = np.zeros((len(pieces), 16), np.int32)
    for i, (row, s) in enumerate(pieces):
        ids = batch["inputs"][row][batch["segment_ids"][row] == s]
        alone_ids[i, : len(ids)], alone_seg[i, : len(ids)] = ids, 1
    both = forward(model, jnp.asarray(np.concatenate([batch["inputs"], alone_ids])),  # one compilation
                   jnp.asarray(np.concatenate([batch["segment_ids"], alone_seg])))
    packed, alone = np.asarray(both[:2]), np.asarray(both[2:])
    assert len(pieces) >= 4
    for i, (row, s) in enumerate(pieces):
        mask = batch["segment_ids"][row] == s
        np.testing.assert_allclose(packed[row][mask], alone[i, : mask.sum()], atol=2e-5, rtol=2e-5)
