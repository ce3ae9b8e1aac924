"""load_tokenizer: the byte tokenizer and Hugging Face tokenizer.json files trained here."""

import json
import pickle

import numpy as np
import pytest

pytest.importorskip("tokenizers")  # an install dependency; absent from some images
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from deltanet_jax.data import ByteTokenizer, HFTokenizer, load_tokenizer

SENTENCES = ["the cat sat on the mat", "a dog ran after the cat", "héllo wörld, the end"]


def _bpe(path, special=("<|endoftext|>",)):
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(special),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    tok.save(str(path))
    return tok


def test_byte_spec():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 256 and tok.eos_id is None
    assert tok.decode(tok.encode("héllo")) == "héllo"
    with pytest.raises(ValueError, match="no end-of-sequence"):
        load_tokenizer("byte", eos_token="</s>")


def test_hf_tokenizer_round_trip_vocab_and_eos(tmp_path):
    raw = _bpe(tmp_path / "tokenizer.json")
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == raw.get_vocab_size() and tok.eos_id == raw.token_to_id("<|endoftext|>") == 0
    text = "the cat ran after héllo"
    ids = tok.encode(text)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert ids == raw.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text and tok.decode(np.array(ids)) == text
    assert [list(x) for x in tok.encode_batch([text, "a dog"])] == [ids, tok.encode("a dog")]
    assert load_tokenizer(str(tmp_path)).vocab_size == tok.vocab_size  # the folder holding tokenizer.json
    again = pickle.loads(pickle.dumps(tok))  # worker processes receive tokenizers pickled
    assert again.encode(text) == ids and again.eos_id == tok.eos_id
    with pytest.raises(ValueError, match="ids in 0.."):
        tok.decode([tok.vocab_size])


def test_hf_eos_from_config_or_argument(tmp_path):
    _bpe(tmp_path / "tokenizer.json", special=("<s>", "</s>", "<pad>"))
    path = str(tmp_path / "tokenizer.json")
    assert load_tokenizer(path).eos_id == 1  # "</s>" is a known name
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<pad>"}))
    assert load_tokenizer(path).eos_id == 2  # the config beside the file wins
    assert load_tokenizer(path, eos_token="<s>").eos_id == 0
    with pytest.raises(ValueError, match="'<nope>' is not in tokenizer"):
        load_tokenizer(path, eos_token="<nope>")


def test_hf_without_eos(tmp_path):
    _bpe(tmp_path / "t.json", special=("<unk>",))
    assert load_tokenizer(str(tmp_path / "t.json")).eos_id is None


def test_bad_specs(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_tokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not a tokenizer")
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
        load_tokenizer(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="tokenizer spec"):
        load_tokenizer("")


def test_corpus_file_with_hf_tokenizer(tmp_path):
    from deltanet_jax.data import build_data
    from deltanet_jax.train.config import DataConfig

    _bpe(tmp_path / "tokenizer.json")
    text = " ".join(SENTENCES * 40)
    (tmp_path / "c.txt").write_text(text)
    config = DataConfig(corpus=str(tmp_path / "c.txt"), tokenizer=str(tmp_path / "tokenizer.json"))
    data = build_data(config, seq_len=8, batch_size=2, seed=0, eval_batches=2)
    ids = np.asarray(data.tokenizer.encode(text))
    n_train = int(len(ids) * 0.9)
    batch = next(data.train)
    assert batch["inputs"].shape == (2, 8) and not data.packed
    for row in range(2):  # every row is a window of the training tokens
        window = np.concatenate([batch["inputs"][row], batch["targets"][row][-1:]])
        starts = [s for s in range(n_train - 8) if (ids[s : s + 9] == window).all()]
        assert starts
    np.testing.assert_array_equal(data.validation[0]["inputs"][0], ids[n_train : n_train + 8])
