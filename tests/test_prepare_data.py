"""experiments.prepare_data: .txt/.jsonl/.parquet files -> ArrayRecord shards, read back exactly."""

import json
import os

import grain
import pytest

pytest.importorskip("tokenizers")  # install dependencies; absent from some images
pytest.importorskip("pyarrow")
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402

from deltanet_jax.data import load_tokenizer, read_metadata
from deltanet_jax.data.prepare import in_validation, prepare_dataset
from deltanet_jax.data.token_records import decode_record
from experiments import prepare_data

WORDS = "the cat sat on mat a dog ran after end".split()


def _tokenizer(path):
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["<unk>", "<|endoftext|>"]))
    tok.save(str(path))
    return str(path)


def _text(i, n):
    return " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(n))


@pytest.fixture()
def inputs(tmp_path):
    """Three formats, 41 non-empty documents; returns (glob, {file name: [document texts]})."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    docs = {}
    docs["a.txt"] = [_text(0, 30)]
    (src / "a.txt").write_text(docs["a.txt"][0])
    docs["sub/b.jsonl"] = [_text(i, 1 + i % 9) for i in range(25)]
    lines = [json.dumps({"body": t, "id": i}) for i, t in enumerate(docs["sub/b.jsonl"])]
    (src / "sub" / "b.jsonl").write_text("\n".join(lines[:10] + [""] + lines[10:]) + "\n")  # a blank line
    docs["c.parquet"] = [_text(i, 2 + i % 5) for i in range(15)]
    pq.write_table(pa.table({"body": docs["c.parquet"] + [None, ""], "n": list(range(17))}), src / "c.parquet")
    return str(src / "**" / "*.*"), docs


def _read_split(out, meta, split):
    """{shard file: [token id lists]} of one split."""
    return {s["file"]: [decode_record(r, meta["dtype"]).tolist()
                        for r in grain.sources.ArrayRecordDataSource([str(out / s["file"])])]
            for s in meta["splits"][split]["shards"]}


def test_prepare_reads_back_exact_tokens(tmp_path, inputs):
    pattern, docs = inputs
    tok_path = _tokenizer(tmp_path / "tokenizer.json")
    tok = load_tokenizer(tok_path)
    out = tmp_path / "ds"
    meta = prepare_dataset(pattern, out, tokenizer=tok_path, workers=1, num_shards=1, val_fraction=0.25,
                           text_field="body", progress=False)
    assert meta == json.loads((out / "metadata.json").read_text())  # what it returns is what it wrote
    assert read_metadata(out)["splits"]["train"]["shards"][0]["path"] == str(out / "train-00000.array_record")
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["eos_id"] == tok.eos_id == 1
    assert meta["tokenizer"]["vocab_size"] == tok.vocab_size and meta["skipped_documents"] == 1
    # Expected records per split, in file order; a document's split is the hash of its file name and index.
    # Keys: the index in a .txt file, the row of a .parquet file, the byte offset of a .jsonl line.
    raw = (tmp_path / "src" / "sub" / "b.jsonl").read_bytes()
    starts = [i for i in range(len(raw)) if (i == 0 or raw[i - 1] == ord("\n")) and raw[i] != ord("\n")]
    keys = {"a.txt": [0], "c.parquet": list(range(15)), "sub/b.jsonl": starts}
    expected = {"train": [], "validation": []}
    for name in sorted(docs):  # a.txt, c.parquet, sub/b.jsonl
        for key, text in zip(keys[name], docs[name], strict=True):
            split = "validation" if in_validation(0, name, key, 0.25) else "train"
            expected[split].append((name, tok.encode(text) + [tok.eos_id]))
    assert 0 < len(expected["validation"]) < 20
    for split in ("train", "validation"):
        (records,) = _read_split(out, meta, split).values()
        assert records == [ids for _, ids in expected[split]]
        assert meta["splits"][split]["documents"] == len(records)
        assert meta["splits"][split]["tokens"] == sum(map(len, records))
    for text, ids in zip(docs["a.txt"], [i for n, i in expected["train"] + expected["validation"] if n == "a.txt"]):
        assert tok.decode(ids[:-1]) == text


def test_workers_give_the_same_shards(tmp_path, inputs):
    pattern, _ = inputs
    tok_path = _tokenizer(tmp_path / "tokenizer.json")
    metas, contents = [], []
    for workers in (1, 2):
        out = tmp_path / f"ds{workers}"
        metas.append(prepare_dataset(pattern, out, tokenizer=tok_path, workers=workers, num_shards=3,
                                     val_fraction=0.2, text_field="body", progress=False))
        contents.append({split: _read_split(out, metas[-1], split) for split in ("train", "validation")})
    assert metas[0]["splits"] == metas[1]["splits"] and contents[0] == contents[1]
    files = {s["file"] for split in ("train", "validation") for s in metas[0]["splits"][split]["shards"]}
    assert {f.split("-")[1] for f in files} == {"00000.array_record", "00001.array_record", "00002.array_record"}


def test_large_files_cut_into_pieces_give_the_same_records(tmp_path):
    lines = [json.dumps({"text": _text(i, 1 + i % 13)}) for i in range(60)]
    (tmp_path / "big.jsonl").write_text("\n".join(lines[:30] + ["", ""] + lines[30:]) + "\n")
    pq.write_table(pa.table({"text": [_text(i, 3 + i % 4) for i in range(40)]}), tmp_path / "big.parquet",
                   row_group_size=6)
    tok = _tokenizer(tmp_path / "tokenizer.json")
    contents = []
    for name, piece_bytes in (("whole", 1 << 30), ("cut", 97)):
        out = tmp_path / name
        meta = prepare_dataset(str(tmp_path / "big.*"), out, tokenizer=tok, num_shards=1, val_fraction=0.3,
                               piece_bytes=piece_bytes, progress=False)
        contents.append({split: _read_split(out, meta, split) for split in ("train", "validation")})
        assert meta["splits"]["train"]["documents"] + meta["splits"]["validation"]["documents"] == 100
    assert contents[0] == contents[1]  # every line and row once, in order, in the same split
    from deltanet_jax.data.documents import split_file
    assert len(split_file(tmp_path / "big.jsonl", 97)) > 10 and len(split_file(tmp_path / "big.parquet", 97)) > 3
    cut = prepare_dataset(str(tmp_path / "big.*"), tmp_path / "cut4", tokenizer=tok, num_shards=4,
                          val_fraction=0.3, piece_bytes=97, progress=False)
    assert len(cut["splits"]["train"]["shards"]) == 4 and cut["splits"]["train"]["documents"] == sum(
        len(r) for r in contents[0]["train"].values())


def test_txt_documents_modes_and_byte_tokenizer(tmp_path):
    (tmp_path / "t.txt").write_text("first line\nsecond\n\n  \nthird block\nstill third\n")
    for mode, want in [("file", 1), ("line", 4), ("paragraph", 2)]:
        meta = prepare_dataset(str(tmp_path / "t.txt"), tmp_path / mode, tokenizer="byte", val_fraction=0.0,
                               txt_documents=mode, progress=False)
        assert meta["splits"]["train"]["documents"] == want and meta["tokenizer"]["eos_id"] is None
    meta = read_metadata(tmp_path / "paragraph")
    records = _read_split(tmp_path / "paragraph", meta, "train")["train-00000.array_record"]
    assert [bytes(r).decode() for r in records] == ["first line\nsecond", "third block\nstill third"]


def test_cli_summary_and_progress(tmp_path, inputs, capsys):
    pattern, _ = inputs
    tok_path = _tokenizer(tmp_path / "tokenizer.json")
    rc = prepare_data.main(["--tokenizer", tok_path, "--input", pattern, "--output", str(tmp_path / "o"),
                            "--workers", "1", "--val-fraction", "0.2", "--text-field", "body"])
    captured = capsys.readouterr()
    assert rc == 0 and "train " in captured.out and "tokenizing" in captured.err  # the tqdm bar
    assert (tmp_path / "o" / "metadata.json").is_file()


def _cli_error(capsys, args):
    rc = prepare_data.main(args + ["--no-progress", "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("prepare_data: error:")
    return err


def test_cli_bad_input(tmp_path, capsys):
    tok = _tokenizer(tmp_path / "tokenizer.json")
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "the cat"}\n')
    out = str(tmp_path / "out")
    assert "no files matched" in _cli_error(capsys, ["--tokenizer", tok, "--input", str(tmp_path / "*.none"),
                                                     "--output", out])
    assert "missing.json" in _cli_error(capsys, ["--tokenizer", str(tmp_path / "missing.json"), "--input",
                                                 str(good), "--output", out])
    (tmp_path / "notjson.json").write_text("[1, 2")
    assert "not a Hugging Face tokenizer" in _cli_error(
        capsys, ["--tokenizer", str(tmp_path / "notjson.json"), "--input", str(good), "--output", out])
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("keep me")
    assert "not empty" in _cli_error(capsys, ["--tokenizer", tok, "--input", str(good), "--output", str(full)])
    assert (full / "x").read_text() == "keep me"
    (tmp_path / "d.csv").write_text("a,b\n")
    assert "unsupported file type '.csv'" in _cli_error(
        capsys, ["--tokenizer", tok, "--input", str(tmp_path / "d.csv"), "--output", out])
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert "not UTF-8" in _cli_error(capsys, ["--tokenizer", tok, "--input", str(tmp_path / "latin.txt"),
                                              "--output", out])
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 garbage")
    assert "cannot read" in _cli_error(capsys, ["--tokenizer", tok, "--input", str(tmp_path / "bad.parquet"),
                                                "--output", out])
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
    assert "line 1 has no field 'text'" in _cli_error(
        capsys, ["--tokenizer", tok, "--input", str(tmp_path / "nofield.jsonl"), "--output", out])
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    assert "no column 'text'" in _cli_error(capsys, ["--tokenizer", tok, "--input", str(tmp_path / "nocol.parquet"),
                                                     "--output", out])
    assert "--val-fraction" not in _cli_error(capsys, ["--tokenizer", tok, "--input", str(good), "--output", out,
                                                       "--val-fraction", "1.5"])
    assert not os.path.exists(out)  # nothing was created by any of the failures


def test_failure_midway_removes_what_was_written(tmp_path):
    tok = _tokenizer(tmp_path / "tokenizer.json")
    lines = [json.dumps({"text": "the cat"})] * 3000 + ["{broken"]  # past the first-record check
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"line 3001 is not JSON"):
        prepare_dataset(str(tmp_path / "a.jsonl"), out, tokenizer=tok, progress=False)
    assert not out.exists()
    out.mkdir()  # an existing empty directory is kept, emptied
    with pytest.raises(ValueError, match=r"line 3001"):
        prepare_dataset(str(tmp_path / "a.jsonl"), out, tokenizer=tok, progress=False)
    assert out.is_dir() and not any(out.iterdir())


def test_tokenizer_without_eos_needs_a_choice(tmp_path):
    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "t.json"))
    (tmp_path / "x.txt").write_text("a b a")
    with pytest.raises(ValueError, match="no end-of-sequence token"):
        prepare_dataset(str(tmp_path / "x.txt"), tmp_path / "o1", tokenizer=str(tmp_path / "t.json"), progress=False)
    meta = prepare_dataset(str(tmp_path / "x.txt"), tmp_path / "o2", tokenizer=str(tmp_path / "t.json"),
                           require_eos=False, val_fraction=0.0, progress=False)
    assert meta["splits"]["train"]["tokens"] == 3
