"""Evaluation: loss / bits per byte / perplexity, loss by position, the evaluate CLI, the lm_eval adapter."""

import json
import math
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from deltanet_jax.data import ByteTokenizer
from deltanet_jax.evaluation import bucket_losses, evaluate_loss, position_losses, target_bytes, token_nll, \
    token_positions
from deltanet_jax.model import DeltaNetForCausalLM

MODEL = dict(vocab_size=256, hidden_size=32, num_hidden_layers=1, num_heads=4, intermediate_size=48)
SEQ_LEN = 16


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from deltanet_jax.train.config import RunConfig
    from deltanet_jax.train.saved_model import write_model_run

    config = RunConfig.from_dict({"model": MODEL, "train": {"seq_len": SEQ_LEN, "eval_batches": 2,
                                                             "implementation": "chunked"}})
    path = tmp_path_factory.mktemp("eval") / "run"
    write_model_run(path, config, DeltaNetForCausalLM(config.model, rngs=nnx.Rngs(2), implementation="chunked"))
    return path


@pytest.fixture(scope="module")
def model(run_dir):
    from deltanet_jax.train.saved_model import load_model

    return load_model(run_dir, implementation="chunked").model


_LOGP = {}


def _logp(model, ids):
    """log-softmax of the logits [B, T, V] (float64 NumPy) from one jitted forward per input shape."""
    if model not in _LOGP:
        _LOGP[model] = nnx.jit(lambda m, x: jax.nn.log_softmax(m(x), axis=-1))
    return np.asarray(_LOGP[model](model, np.asarray(ids, np.int32)), np.float64)


def _batch(rng, b=2, t=SEQ_LEN):
    w = rng.integers(0, 256, size=(b, t + 1)).astype(np.int32)
    return {"inputs": w[:, :-1].copy(), "targets": w[:, 1:].copy()}


def test_loss_bits_per_byte_and_perplexity_match_the_logits(model):
    rng = np.random.default_rng(0)
    batches = [_batch(rng), _batch(rng)]
    batches[1]["targets"][0, :5] = -1  # ignored positions
    report = evaluate_loss(model, batches, ByteTokenizer())
    nll = []
    for b in batches:
        logp = _logp(model, b["inputs"])
        for (i, j), t in np.ndenumerate(b["targets"]):
            if t >= 0:
                nll.append(-logp[i, j, t])
    assert report.tokens == len(nll) == 4 * SEQ_LEN - 5
    np.testing.assert_allclose(report.loss, np.mean(nll), rtol=1e-5)
    assert report.bytes == report.tokens
    np.testing.assert_allclose(report.bits_per_byte, report.loss / math.log(2), rtol=1e-6)
    np.testing.assert_allclose(report.perplexity, math.exp(report.loss), rtol=1e-6)


def test_bytes_of_a_subword_tokenizer_come_from_the_decoded_text():
    class Pieces:
        spec, vocab_size, eos_id = "pieces.json", 4, None
        words = ["a", "bcd", "é", "  "]

        def decode(self, ids):
            return "".join(self.words[i] for i in ids)

    batch = {"inputs": np.zeros((2, 3), np.int32), "targets": np.array([[0, 1, 2], [3, -1, 1]], np.int32),
             "segment_ids": np.array([[1, 1, 1], [1, 1, 0]], np.int32)}
    assert target_bytes(batch, Pieces()) == (1 + 3 + 2) + 2  # row 2: only "  " is scored


def test_positions_restart_with_each_packed_document_and_buckets_weight_by_tokens(model):
    seg = np.array([[1, 1, 1, 2, 2, 0], [3, 3, 3, 3, 3, 3]])
    pos = token_positions({"inputs": np.zeros((2, 6), np.int32), "segment_ids": seg})
    np.testing.assert_array_equal(pos, [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    rows = bucket_losses(np.array([1.0, 2.0, 3.0, np.nan]), np.array([1, 3, 2, 0]), 2)
    assert rows[0] == {"start": 0, "end": 2, "loss": 7.0 / 4, "tokens": 4}
    assert rows[1]["loss"] == 3.0 and rows[1]["tokens"] == 2
    rng = np.random.default_rng(1)
    b = _batch(rng)
    losses, counts = position_losses(model, [b])
    np.testing.assert_array_equal(counts, [2] * SEQ_LEN)
    np.testing.assert_allclose(losses, token_nll(model, b).mean(axis=0), rtol=1e-6)


def test_token_nll_refuses_bad_batches(model):
    with pytest.raises(ValueError, match="targets"):
        token_nll(model, {"inputs": np.zeros((1, 4), np.int32)})
    with pytest.raises(ValueError, match="vocabulary"):
        token_nll(model, {"inputs": np.full((1, 4), 300, np.int32), "targets": np.zeros((1, 4), np.int32)})


def _evaluate(argv):
    from experiments.evaluate import main

    return main([str(a) for a in argv])


def test_evaluate_cli_reports_loss_and_length_extrapolation(run_dir, model, tmp_path, capsys):
    out = tmp_path / "report"
    rc = _evaluate(["--run-dir", run_dir, "--batch-size", 2, "--extrapolation", 2, "--out", out])
    text = capsys.readouterr().out
    assert rc == 0, text
    res = json.loads((out / "evaluation.json").read_text())
    assert (out / "length_extrapolation.png").stat().st_size > 0
    assert not (run_dir / "evaluation.json").exists()
    from deltanet_jax.data import load_corpus, validation_batches

    val = validation_batches(load_corpus().validation, seq_len=SEQ_LEN, batch_size=2, num_batches=2)
    ref = evaluate_loss(model, val, ByteTokenizer())
    np.testing.assert_allclose(res["loss"], ref.loss, rtol=1e-5)
    np.testing.assert_allclose(res["bits_per_byte"], ref.loss / math.log(2), rtol=1e-5)
    np.testing.assert_allclose(res["perplexity"], math.exp(ref.loss), rtol=1e-5)
    ext = res["length_extrapolation"]
    assert ext["train_seq_len"] == SEQ_LEN and ext["eval_seq_len"] == 2 * SEQ_LEN
    assert [(b["start"], b["end"]) for b in ext["buckets"]] == [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert all(b["tokens"] == 2 * 2 * 8 for b in ext["buckets"])
    assert len(ext["per_position_loss"]) == 2 * SEQ_LEN
    assert f"perplexity {res['perplexity']:.3f}" in text and "beyond the training length" in text


def test_evaluate_cli_refuses_bad_input(run_dir, tmp_path, capsys):
    shutil.copytree(run_dir, tmp_path / "nockpt", ignore=shutil.ignore_patterns("checkpoints"))
    assert _evaluate(["--run-dir", tmp_path / "nockpt"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert _evaluate(["--run-dir", run_dir, "--seq-len", 0]) == 2
    assert "--seq-len" in capsys.readouterr().err
    assert _evaluate(["--run-dir", run_dir, "--data", tmp_path / "missing.txt"]) == 2
    assert "missing.txt" in capsys.readouterr().err


# ---- lm-evaluation-harness ------------------------------------------------------------------------------------

CHOICE_YAML = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
target_delimiter: ""
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""

GEN_YAML = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: prompt
doc_to_target: target
generation_kwargs:
  until: ["z"]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
"""


def test_lm_eval_adapter_scores_a_local_task(run_dir, model, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from deltanet_jax.lm_eval_adapter import DeltaNetLM, evaluate_tasks

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    docs = [{"question": "The cat sat on the", "choices": [" mat", " moon", " xq"], "answer": 0},
            {"question": "One, two,", "choices": [" three", " blue"], "answer": 1},
            {"question": "", "choices": ["Hello", "World!"], "answer": 0}]
    (tmp_path / "choice.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    gens = [{"prompt": "To be or", "target": "x"}, {"prompt": "abc", "target": "y"}]
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in gens))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_choice.yaml").write_text(CHOICE_YAML.format(data=tmp_path / "choice.jsonl"))
    (tasks / "tiny_gen.yaml").write_text(GEN_YAML.format(data=tmp_path / "gen.jsonl"))

    with pytest.raises(ValueError, match="unknown lm_eval task"):
        evaluate_tasks(model, ByteTokenizer(), ["no_such_task"], include_path=str(tasks), include_defaults=False)
    out = tmp_path / "out"
    assert _evaluate(["--run-dir", run_dir, "--tasks", "tiny_choice,tiny_gen", "--include-path", tasks,
                      "--out", out]) == 0
    scores = json.loads((out / "evaluation.json").read_text())["lm_eval"]

    # accuracy from our own log-likelihoods (a direct forward pass per choice)
    def loglik(context, continuation):
        ids = list((context or "\n").encode()) + list(continuation.encode())
        logp = _logp(model, [ids[:-1] + [0] * (64 - len(ids) + 1)])[0]  # right padding: causal, unseen
        n = len(continuation.encode())
        return sum(logp[len(ids) - 1 - n + i, ids[len(ids) - n + i]] for i in range(n))

    picks = [int(np.argmax([loglik(d["question"], c) for c in d["choices"]])) == d["answer"] for d in docs]
    assert scores["tiny_choice"]["acc"] == pytest.approx(np.mean(picks))
    assert 0.0 <= scores["tiny_gen"]["exact_match"] <= 1.0

    class Req:
        def __init__(self, *args):
            self.args = args

    lm = DeltaNetLM(model, ByteTokenizer(), batch_size=4)
    got = lm.loglikelihood([Req("The cat sat on the", " mat"), Req("", "Hello")])
    assert got[0][0] == pytest.approx(loglik("The cat sat on the", " mat"), rel=1e-4)
    assert got[1][0] == pytest.approx(loglik("", "Hello"), rel=1e-4)
    text = "a short text to score in windows"
    assert lm.loglikelihood_rolling([Req(text)])[0] == pytest.approx(loglik("", text), rel=1e-4)
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
        token_list=list(text.encode()), prefix_token=10, max_seq_len=8, context_len=1)]
    assert len(windows) == 4
    by_window = sum(loglik(bytes(c).decode(), bytes(t).decode()) for c, t in windows)
    short = DeltaNetLM(model, ByteTokenizer(), batch_size=4, max_length=8)
    assert short.loglikelihood_rolling([Req(text)])[0] == pytest.approx(by_window, rel=1e-4)


def test_lm_eval_adapter_module_imports_without_lm_eval():
    import deltanet_jax.lm_eval_adapter as adapter

    assert hasattr(adapter, "DeltaNetLM") and hasattr(adapter, "check_tasks_available")
