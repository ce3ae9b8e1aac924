"""The model family: DeltaNet / attention hybrids, the Transformer++ baseline, linear attention, presets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deltanet_jax.model import DeltaNetConfig, DeltaNetForCausalLM, num_params
from deltanet_jax.train.config import RunConfig
from experiments.pretrain import load_preset, preset_names

TINY = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_heads=4, intermediate_size=48)
ATTN = dict(num_heads=4, num_kv_heads=2)
VARIANTS = {
    "sliding-hybrid": dict(attn={"layers": [1], "window_size": 3, **ATTN}),
    "global-hybrid": dict(attn={"layers": [0], "rope_theta": 100.0, **ATTN}),
    "transformer++": dict(attn={"layers": [0, 1], "window_size": 4, **ATTN}),  # sliding everywhere
    "linear": dict(mixer="linear"),
}
T = 12


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


_MODELS = {}


def _model(name):
    if name not in _MODELS:
        cfg = DeltaNetConfig(**TINY, **VARIANTS[name])
        _MODELS[name] = DeltaNetForCausalLM(cfg, rngs=nnx.Rngs(0), implementation="recurrent")
    return _MODELS[name]


@nnx.jit
def _logits(model, ids, segment_ids=None):
    return model(ids, segment_ids)


@nnx.jit(static_argnames="max_length")
def _prefill(model, ids, segment_ids=None, max_length=None):
    return model.prefill(ids, segment_ids, max_length=max_length)


@nnx.jit
def _step(model, token_ids, cache):
    return model.decode_step(token_ids, cache)


def _prefill_decode(model, ids, segment_ids, n_prompt, max_length):
    logits, cache = _prefill(model, ids[:, :n_prompt], segment_ids, max_length=max_length)
    steps = []
    for t in range(n_prompt, ids.shape[1]):
        step_logits, cache = _step(model, ids[:, t], cache)
        steps.append(step_logits)
    return logits, jnp.stack(steps, 1)


def _ids(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(1, TINY["vocab_size"], size=shape), jnp.int32)


@pytest.mark.parametrize("name", ["sliding-hybrid", "global-hybrid", "transformer++"])
def test_logits_are_causal(name):
    model = _model(name)
    ids = _ids((3, T))
    cut = 7
    changed = ids.at[:, cut:].set((ids[:, cut:] + 7) % TINY["vocab_size"])
    a, b = _logits(model, ids), _logits(model, changed)
    np.testing.assert_allclose(a[:, :cut], b[:, :cut], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[:, cut:], b[:, cut:], atol=1e-3)


@pytest.mark.parametrize("name", ["sliding-hybrid", "global-hybrid", "transformer++"])
def test_packed_segments_equal_separate_sequences(name):
    model = _model(name)
    lengths = [5, 1, 4]  # and 2 padding tokens
    seqs = [_ids((n,), seed=i + 1) for i, n in enumerate(lengths)]
    row = jnp.concatenate(seqs + [jnp.zeros((T - sum(lengths),), jnp.int32)])
    seg_row = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(T - sum(lengths))])
    packed = jnp.stack([row] * 3)
    seg = jnp.asarray(np.stack([seg_row] * 3), jnp.int32)
    alone = jnp.stack([jnp.concatenate([s, _ids((T - len(s),), seed=9)]) for s in seqs])
    got, ref = _logits(model, packed, seg), _logits(model, alone)
    start = 0
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(got[0, start:start + n], ref[i, :n], rtol=1e-4, atol=1e-4)
        start += n


@pytest.mark.parametrize("name", list(VARIANTS))
def test_prefill_then_decode_equals_full_forward(name):
    """Decoding runs past the sliding windows (3 and 4 tokens) and fills the global caches exactly."""
    model = _model(name)
    ids = _ids((3, T))
    full = _logits(model, ids)
    ones = jnp.ones((3, 5), jnp.int32)  # one segment per row: the same as no segment_ids
    prompt_logits, step_logits = _prefill_decode(model, ids, ones, 5, T)
    np.testing.assert_allclose(prompt_logits, full[:, :5], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(step_logits, full[:, 5:], rtol=1e-4, atol=1e-4)


def test_left_padded_hybrid_prompts_decode_like_unpadded_ones():
    model = _model("sliding-hybrid")
    lengths = [5, 2, 4]
    seqs = [_ids((n + 7,), seed=20 + i) for i, n in enumerate(lengths)]
    ids = jnp.stack([jnp.concatenate([jnp.zeros((5 - n,), jnp.int32), s]) for n, s in zip(lengths, seqs)])
    seg = jnp.asarray([[0] * (5 - n) + [1] * n for n in lengths], jnp.int32)
    prompt_logits, steps = _prefill_decode(model, ids, seg, 5, T)
    ref = _logits(model, jnp.stack([jnp.concatenate([s, jnp.ones((T - len(s),), jnp.int32)]) for s in seqs]))
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(prompt_logits[i, 5 - n:], ref[i, :n], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(steps[i], ref[i, n:n + 7], rtol=1e-4, atol=1e-4)


def test_hybrid_cache_holds_kv_for_attention_layers_only():
    model = _model("sliding-hybrid")
    cache = model.init_cache(2, max_length=16)
    assert [type(c).__name__ for c in cache] == ["DeltaNetCache", "AttentionCache"]
    assert cache[1].k.shape == (2, 3, 2, 8)  # ring buffer of the window
    glob = _model("global-hybrid").init_cache(2, max_length=16)
    assert glob[0].k.shape == (2, 16, 2, 8)
    with pytest.raises(ValueError, match="max_length"):
        _model("global-hybrid").prefill(_ids((1, T)), max_length=8)


def test_mixer_rejects_unknown_values():
    with pytest.raises(ValueError, match="mixer"):
        DeltaNetConfig(**TINY, mixer="mamba")
    with pytest.raises(ValueError, match="allow_neg_eigval"):
        DeltaNetConfig(**TINY, mixer="linear", allow_neg_eigval=True)


# ---- presets ---------------------------------------------------------------------------------------------

FAMILY = ["deltanet", "deltanet-swa-hybrid", "deltanet-global-hybrid", "transformer-pp", "linear-attention"]
FLA_PARAMS_M = {"deltanet-340m": 374.4, "deltanet-1.3b": 1365.7}


def _abstract(cfg: DeltaNetConfig) -> DeltaNetForCausalLM:
    return nnx.eval_shape(lambda: DeltaNetForCausalLM(cfg, rngs=nnx.Rngs(0)))


def test_every_preset_loads_through_the_run_config():
    names = preset_names()
    want = [f"{f}-{s}" for f in FAMILY for s in ("340m", "1.3b")]
    want += ["tiny-shakespeare"] + [f"tiny-shakespeare-{f.removeprefix('deltanet-')}" for f in FAMILY[1:]]
    assert set(want) <= set(names)
    for name in want:
        cfg = RunConfig.from_dict(load_preset(name)[1]).model
        large = not name.startswith("tiny")
        assert cfg.vocab_size == (32000 if large else 256) and cfg.tie_word_embeddings is False


@pytest.mark.parametrize("size,hidden,heads", [("340m", 1024, 8), ("1.3b", 2048, 16)])
def test_preset_layouts_follow_the_paper(size, hidden, heads):
    cfgs = {f: RunConfig.from_dict(load_preset(f"{f}-{size}")[1]).model for f in FAMILY}
    for cfg in cfgs.values():
        assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_heads) == (hidden, 24, heads)
    assert cfgs["deltanet"].attn is None and cfgs["deltanet"].mixer == "delta"
    swa = cfgs["deltanet-swa-hybrid"].attn
    assert swa["layers"] == list(range(1, 24, 2)) and swa["window_size"] is not None
    glob = cfgs["deltanet-global-hybrid"].attn
    assert glob["layers"] == [1, 12] and glob["window_size"] is None  # 2nd and (N/2+1)-th, 1-based
    assert cfgs["transformer-pp"].attn["layers"] == list(range(24))
    assert cfgs["linear-attention"].mixer == "linear"


@pytest.mark.parametrize("name", sorted(FLA_PARAMS_M))
def test_deltanet_presets_have_fla_parameter_counts(name):
    model = _abstract(RunConfig.from_dict(load_preset(name)[1]).model)
    assert round(num_params(model) / 1e6, 1) == FLA_PARAMS_M[name]


def test_tiny_presets_place_attention_layers_like_the_large_ones():
    def kinds(name):
        model = _abstract(RunConfig.from_dict(load_preset(name)[1]).model)
        return [type(layer.attn).__name__ for layer in model.model.layers]
    assert kinds("tiny-shakespeare-transformer-pp") == ["Attention"] * 4
    assert kinds("tiny-shakespeare-global-hybrid") == ["DeltaNet", "Attention", "Attention", "DeltaNet"]
    assert kinds("tiny-shakespeare-swa-hybrid") == ["DeltaNet", "Attention"] * 2
    assert kinds("tiny-shakespeare-linear-attention") == ["LinearAttention"] * 4
