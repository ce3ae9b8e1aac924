"""Generation: cached decoding equals recomputation, batching, sampling, stop tokens, state size, CLI."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deltanet_jax.generation import cache_shapes, check_prompts, generate, generate_stream, prompt_bucket, sample_tokens, \
    sampling_settings
from deltanet_jax.model import DeltaNetConfig, DeltaNetForCausalLM

# initializer_range 0.2 makes the random models' next-token distributions peaked, so greedy
# choices are not near-ties that float rounding could flip between code paths.
TINY = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_heads=4, intermediate_size=48,
            initializer_range=0.2, max_position_embeddings=32)
ATTN = dict(num_heads=4, num_kv_heads=2)
VARIANTS = {
    "deltanet": dict(num_hidden_layers=1),  # one layer: the DeltaNet state path, compiled faster
    "sliding-hybrid": dict(attn={"layers": [1], "window_size": 3, **ATTN}),  # decoding runs past the window
    "global-hybrid": dict(attn={"layers": [0], **ATTN}),
}
PROMPTS = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5, 8, 9, 7]]  # one bucket (8)
NEW = 10

_MODELS = {}


def _model(name):
    if name not in _MODELS:
        _MODELS[name] = DeltaNetForCausalLM(DeltaNetConfig(**{**TINY, **VARIANTS[name]}), rngs=nnx.Rngs(0),
                                            implementation="chunked")
    return _MODELS[name]


_GREEDY = {}


def _greedy(name):
    if name not in _GREEDY:
        _GREEDY[name] = generate(_model(name), PROMPTS, max_new_tokens=NEW)
    return _GREEDY[name]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_greedy_decoding_equals_full_recomputation(name):
    cached = _greedy(name)
    assert [len(r) for r in cached] == [NEW] * len(PROMPTS)
    assert cached == generate(_model(name), PROMPTS, max_new_tokens=NEW, use_cache=False)


@pytest.mark.parametrize("name", ["deltanet", "sliding-hybrid"])
def test_batched_prompts_of_different_lengths_equal_single_prompts(name):
    """Each prompt alone (repeated to the same batch size, so nothing recompiles; rows never interact)
    continues as it does among prompts of other lengths."""
    singles = [generate(_model(name), [p] * len(PROMPTS), max_new_tokens=NEW) for p in PROMPTS]
    assert all(s == [s[0]] * len(PROMPTS) for s in singles)
    assert [s[0] for s in singles] == _greedy(name)


def test_streamed_chunks_concatenate_to_the_generated_tokens():
    chunks = list(generate_stream(_model("deltanet"), PROMPTS, max_new_tokens=NEW, chunk_size=4))
    assert len(chunks) == 1 + 3  # the prefill's token, then 4 + 4 + 1
    assert [sum((c[i] for c in chunks), []) for i in range(len(PROMPTS))] == _greedy("deltanet")


def test_stop_tokens_end_each_row_at_its_first_stop():
    ref = _greedy("deltanet")
    stop = ref[0][3]
    got = generate(_model("deltanet"), PROMPTS, max_new_tokens=NEW, stop_tokens=[stop])
    for row, full in zip(got, ref):
        expect = full[:full.index(stop) + 1] if stop in full else full
        assert row == expect
    assert got[0][-1] == stop and len(got[0]) <= 4


def test_every_row_stopping_at_the_first_token_ends_generation():
    firsts = sorted({r[0] for r in _greedy("deltanet")})
    got = generate(_model("deltanet"), PROMPTS, max_new_tokens=NEW, stop_tokens=firsts)
    assert got == [[r[0]] for r in _greedy("deltanet")]


def test_sampling_top_k_one_and_tiny_top_p_are_greedy_and_seeds_reproduce():
    model, ref = _model("deltanet"), _greedy("deltanet")
    assert generate(model, PROMPTS, max_new_tokens=NEW, temperature=1.0, top_k=1, seed=3) == ref
    assert generate(model, PROMPTS, max_new_tokens=NEW, temperature=1.0, top_p=1e-6, seed=4) == ref
    a = generate(model, PROMPTS, max_new_tokens=NEW, temperature=2.0, top_k=20, seed=0)
    assert a == generate(model, PROMPTS, max_new_tokens=NEW, temperature=2.0, top_k=20, seed=0)
    assert a != generate(model, PROMPTS, max_new_tokens=NEW, temperature=2.0, top_k=20, seed=1)


def test_sample_tokens_respects_top_k_and_top_p():
    logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.3, 0.15]] * 256, jnp.float32))
    keys = jax.random.split(jax.random.key(0), 4)
    sample = jax.jit(sample_tokens, static_argnums=2)

    def draws(**kw):
        mode, params = sampling_settings(4, **kw)
        return np.concatenate([np.asarray(sample(logits, k, mode, params)) for k in keys])

    assert set(draws(temperature=1.0, top_k=2)) == {1, 2}
    assert set(draws(temperature=1.0, top_p=0.7)) == {1, 2}  # 0.5 < 0.7 <= 0.8
    assert set(draws(temperature=1.0, top_p=0.5)) == {1}
    assert set(draws(temperature=1.0)) == {0, 1, 2, 3}
    mode, params = sampling_settings(4)
    assert set(np.asarray(sample(logits, keys[0], mode, params))) == {1}


def _shapes(tree):
    return [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]


def test_deltanet_decoding_state_does_not_grow_with_generated_tokens():
    model = _model("deltanet")
    short, long = cache_shapes(model, 2, 5, 4), cache_shapes(model, 2, 5, 4000)
    assert _shapes(short) == _shapes(long)
    assert sum(x.size for x in jax.tree.leaves(short)) == sum(x.size for x in jax.tree.leaves(long))
    # a global-attention cache grows with the total length (the check can tell the two apart)
    glob = _model("global-hybrid")
    assert _shapes(cache_shapes(glob, 2, 5, 4)) != _shapes(cache_shapes(glob, 2, 5, 20))


def test_prompt_buckets():
    assert [prompt_bucket(n) for n in (1, 8, 9, 200, 256, 257, 600)] == [8, 8, 16, 256, 256, 512, 768]


def test_bad_requests_are_refused_before_any_work():
    model = _model("deltanet")
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1, 2], []], max_new_tokens=3)
    with pytest.raises(ValueError, match="non-empty list"):
        generate(model, [], max_new_tokens=3)
    with pytest.raises(ValueError, match="outside"):
        generate(model, [[1, 50]], max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [[1]], max_new_tokens=3, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], max_new_tokens=3, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, [[1]], max_new_tokens=3, temperature=1.0, top_k=0)
    with pytest.raises(ValueError, match="stop token"):
        generate(model, [[1]], max_new_tokens=3, stop_tokens=[99])
    with pytest.raises(ValueError, match="32-token limit"):  # global attention: max_position_embeddings
        generate(_model("global-hybrid"), [[1] * 30], max_new_tokens=3)
    assert check_prompts(_model("sliding-hybrid"), [[1] * 30], 300) == [[1] * 30]  # sliding windows: no limit


# ---- CLI ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from deltanet_jax.train.config import RunConfig
    from deltanet_jax.train.saved_model import write_model_run

    config = RunConfig.from_dict({"model": dict(TINY, vocab_size=256, num_hidden_layers=1),
                                  "train": {"seq_len": 16, "implementation": "chunked"}})
    path = tmp_path_factory.mktemp("gen") / "run"
    write_model_run(path, config, DeltaNetForCausalLM(config.model, rngs=nnx.Rngs(1)))
    return path


def _cli(argv):
    from experiments.generate import main

    out = io.StringIO()
    return main([str(a) for a in argv], out=out), out.getvalue()


def test_cli_streams_the_continuation_with_and_without_cache(run_dir, capsys):
    base = ["--run-dir", run_dir, "--prompt", "To be", "--max-new-tokens", 9, "--temperature", 0]
    rc, text = _cli(base + ["--chunk-size", 8])
    assert rc == 0 and text.startswith("To be") and text.endswith("\n")
    rc2, text2 = _cli(base + ["--chunk-size", 8, "--no-cache"])
    assert rc2 == 0 and text2 == text
    assert capsys.readouterr().err.count("[9 tokens in") == 2  # bytes have no stop token: all 9 come


def test_cli_refuses_bad_input(run_dir, tmp_path, capsys):
    assert _cli(["--run-dir", run_dir, "--prompt", ""])[0] == 2
    assert "--prompt is empty" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert _cli(["--run-dir", tmp_path / "empty", "--prompt", "a"])[0] == 2
    assert "config.json" in capsys.readouterr().err
    import shutil

    shutil.copytree(run_dir, tmp_path / "nockpt", ignore=shutil.ignore_patterns("checkpoints"))
    assert _cli(["--run-dir", tmp_path / "nockpt", "--prompt", "a"])[0] == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert _cli(["--run-dir", run_dir, "--prompt", "a", "--top-p", "1.5"])[0] == 2
    assert "top_p" in capsys.readouterr().err


def test_bench_generate_quick_runs_without_writing_benchmarks(tmp_path, monkeypatch):
    import json

    from experiments import bench_generate

    def refuse(*args, **kwargs):
        raise AssertionError("--quick / --no-write must leave BENCHMARKS.md alone")

    monkeypatch.setattr(bench_generate, "update_section", refuse)
    rc = bench_generate.main(["--quick", "--no-write", "--batches", "2", "--prompt-len", "5", "--new-tokens", "4",
                              "--reps", "1", "--json", str(tmp_path / "r.json")])
    assert rc == 0
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [r["batch"] for r in rows] == [2] and rows[0]["ours_tps"] > 0 and "fla_s" not in rows[0]


@pytest.mark.gpu
def test_gpu_cached_greedy_equals_recomputation_with_the_pallas_prefill():
    """On the GPU the prefill runs the Pallas kernel (head dim 16) and decoding the one-token step."""
    config = DeltaNetConfig(**{**TINY, "hidden_size": 64, "intermediate_size": 128, **VARIANTS["sliding-hybrid"]})
    with jax.default_matmul_precision("highest"):
        model = DeltaNetForCausalLM(config, rngs=nnx.Rngs(0), implementation="pallas")
        cached = generate(model, PROMPTS, max_new_tokens=NEW)
        assert cached == generate(model, PROMPTS, max_new_tokens=NEW, use_cache=False)
        chunked = DeltaNetForCausalLM(config, rngs=nnx.Rngs(0), implementation="chunked")
        assert generate(chunked, PROMPTS, max_new_tokens=NEW) == cached


def test_cli_text_stream_and_the_tokenizer_json_of_a_moved_run(tmp_path):
    pytest.importorskip("tokenizers")
    import types

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from deltanet_jax.data import ByteTokenizer, HFTokenizer
    from experiments.generate import TextStream, resolve_tokenizer

    text = "héllo wörld, the cat sat"
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text, "the mat"], trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    config = types.SimpleNamespace(data=types.SimpleNamespace(tokenizer="/moved/away/tokenizer.json"))
    hf = resolve_tokenizer(tmp_path, None, config)  # the recorded path is gone: the run dir's copy
    assert isinstance(hf, HFTokenizer) and hf.eos_id is not None
    assert isinstance(resolve_tokenizer(tmp_path, "byte", config), ByteTokenizer)
    for tokenizer in (hf, ByteTokenizer()):
        out = io.StringIO()
        stream = TextStream(tokenizer, out)
        for t in tokenizer.encode(text):  # one token at a time: no half characters printed
            stream.add([int(t)])
            assert "\ufffd" not in out.getvalue()
        stream.add([], final=True)
        assert out.getvalue() == text


def test_bench_generate_skips_fla_for_models_it_cannot_build(capsys):
    from deltanet_jax.model import DeltaNetConfig
    from experiments.bench_generate import has_fla_counterpart

    tiny = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_heads=2)
    assert has_fla_counterpart(DeltaNetConfig(**tiny))
    assert not has_fla_counterpart(DeltaNetConfig(**tiny, use_mlp=False))
    assert not has_fla_counterpart(DeltaNetConfig(**tiny, mixer="linear"))
    err = capsys.readouterr().err
    assert "use_mlp=False" in err and "mixer='linear'" in err and err.count("measuring without fla") == 2
