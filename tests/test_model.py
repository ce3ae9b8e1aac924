"""DeltaNetConfig validation and the causal LM: causality, packing, decoding, parameter count."""

import dataclasses
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deltanet_jax.model import DeltaNetConfig, DeltaNetForCausalLM, num_params

TINY = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_heads=2, intermediate_size=48)


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    """GPUs default to TF32 float32 matmuls; these tests compare against float64 NumPy at 1e-4."""
    with jax.default_matmul_precision("highest"):
        yield


def _build(impl="chunked", dtype=jnp.float32, remat=False, **overrides):
    cfg = DeltaNetConfig(**{**TINY, **overrides})
    return DeltaNetForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=dtype, implementation=impl, remat=remat)


@functools.lru_cache(maxsize=None)
def _cached(impl, dtype, remat, overrides):
    return _build(impl, dtype, remat, **dict(overrides))


def _model(impl="chunked", dtype=jnp.float32, remat=False, **overrides):
    """A shared (read-only) tiny model per distinct argument set."""
    return _cached(impl, dtype, remat, tuple(sorted(overrides.items())))


@nnx.jit
def _logits(model, ids, segment_ids=None):
    return model(ids, segment_ids)


def _ids(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, TINY["vocab_size"], size=shape), jnp.int32)


# ---- config ------------------------------------------------------------------------------------------

def test_config_round_trips_through_dict_and_json():
    cfg = DeltaNetConfig(**TINY, use_gate=True, expand_v=2.0, tie_word_embeddings=True,
                         attn={"layers": [1], "num_heads": 4})
    again = DeltaNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert cfg.attn == {"layers": [1], "num_heads": 4, "num_kv_heads": 4, "qkv_bias": False,
                        "window_size": None, "rope_theta": 10000.0}


def test_config_defaults_follow_fla():
    cfg = DeltaNetConfig()
    assert (cfg.hidden_size, cfg.num_heads, cfg.num_hidden_layers, cfg.vocab_size) == (2048, 16, 24, 32000)
    assert (cfg.qk_norm, cfg.qk_activation, cfg.conv_size, cfg.norm_eps) == ("l2", "silu", 4, 1e-6)
    assert cfg.mlp_intermediate_size == 5632 and cfg.head_k_dim == 128


def test_config_loads_an_fla_config_json():
    fla_json = {
        "architectures": ["DeltaNetForCausalLM"], "attn": None, "attn_mode": "chunk", "bos_token_id": 1,
        "conv_size": 4, "eos_token_id": 2, "expand_k": 1, "expand_v": 1, "fuse_cross_entropy": True,
        "fuse_norm": True, "fuse_swiglu": True, "hidden_act": "swish", "hidden_ratio": 4, "hidden_size": 1024,
        "initializer_range": 0.02, "intermediate_size": None, "max_position_embeddings": 2048,
        "model_type": "delta_net", "norm_eps": 1e-06, "num_heads": 8, "num_hidden_layers": 24,
        "qk_activation": "silu", "qk_norm": "l2", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.50.1", "use_beta": True, "use_cache": True, "use_gate": False,
        "use_output_norm": True, "use_short_conv": True, "vocab_size": 32000, "elementwise_affine": True,
        "use_l2warp": False, "pad_token_id": None,
    }
    cfg = DeltaNetConfig.from_dict(fla_json)
    assert cfg.hidden_size == 1024 and cfg.head_v_dim == 128 and cfg.mlp_intermediate_size == 2816


def test_config_rejects_unknown_keys_by_name():
    with pytest.raises(ValueError, match="hiden_size, num_layer"):
        DeltaNetConfig.from_dict({**TINY, "hiden_size": 3, "num_layer": 2})
    with pytest.raises(ValueError, match="config.attn key.*heads"):
        DeltaNetConfig.from_dict({**TINY, "attn": {"layers": [0], "num_heads": 2, "heads": 2}})


@pytest.mark.parametrize("key,value", [
    ("hidden_size", 0), ("num_heads", 3), ("num_hidden_layers", -1), ("vocab_size", 2.5), ("conv_size", 0),
    ("qk_norm", "l1"), ("qk_activation", "gelu"), ("hidden_act", "gelu"), ("norm_eps", 0.0),
    ("expand_k", 0), ("expand_v", 0.3), ("use_gate", "yes"), ("intermediate_size", 0), ("hidden_ratio", -2),
    ("initializer_range", 0), ("use_output_norm", False), ("attn_mode", "fused_chunk"),
    ("attn", {"num_heads": 2}), ("attn", {"layers": [5], "num_heads": 2}), ("attn", [1]), ("model_type", "llama"),
    ("bos_token_id", -1), ("mixer", "rnn"), ("attn", {"layers": [0], "num_heads": 5}), ("use_mlp", "no"),
])
def test_config_rejects_bad_values_naming_the_key(key, value):
    name = {"num_heads": "expand_k"}.get(key, key)  # heads that do not divide the key dim are reported there
    with pytest.raises(ValueError, match=name.split("_")[0]):
        DeltaNetConfig.from_dict({**TINY, key: value})


def test_layers_listed_in_attn_are_attention_as_in_fla():
    from deltanet_jax.nn import Attention, DeltaNet, LinearAttention
    cfg = DeltaNetConfig(**{**TINY, "num_hidden_layers": 3}, attn={"layers": [1], "num_heads": 4, "num_kv_heads": 2})
    model = nnx.eval_shape(lambda: DeltaNetForCausalLM(cfg, rngs=nnx.Rngs(0)))
    kinds = [type(layer.attn) for layer in model.model.layers]
    assert kinds == [DeltaNet, Attention, DeltaNet]
    assert model.model.layers[1].attn.k_proj.kernel.shape == (32, 16)
    linear = DeltaNetConfig(**TINY, mixer="linear")
    model = nnx.eval_shape(lambda: DeltaNetForCausalLM(linear, rngs=nnx.Rngs(0)))
    assert all(type(layer.attn) is LinearAttention and not hasattr(layer.attn, "b_proj")
               for layer in model.model.layers)


# ---- parameters ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{}, {"use_gate": True, "tie_word_embeddings": True},
                                {"use_short_conv": False, "expand_k": 0.5, "expand_v": 2.0, "intermediate_size": None},
                                {"use_mlp": False}])
def test_num_params_matches_formula(kw):
    model = nnx.eval_shape(lambda: _build(**kw))
    c = model.config
    h, kd, vd, heads, w = c.hidden_size, c.key_dim, c.value_dim, c.num_heads, c.conv_size
    inter = c.intermediate_size or 256 * -(-int(h * 4 * 2 / 3) // 256)
    mlp = h + 3 * h * inter if c.use_mlp else 0  # its norm and three projections
    layer = (2 * h * kd + h * vd + h * heads + vd * h + vd // heads + h + mlp
             + (h * vd if c.use_gate else 0) + ((2 * kd + vd) * w if c.use_short_conv else 0))
    want = c.vocab_size * h + c.num_hidden_layers * layer + h + (0 if c.tie_word_embeddings else h * c.vocab_size)
    assert num_params(model) == want


def test_init_follows_fla():
    model = _model()
    emb = np.asarray(model.model.embeddings.embedding[...])
    assert abs(emb.std() - 0.02) < 0.002 and abs(emb.mean()) < 0.002
    np.testing.assert_array_equal(model.model.layers[0].attn_norm.weight[...], 1.0)
    np.testing.assert_array_equal(model.model.layers[1].attn.o_norm.weight[...], 1.0)
    assert model.lm_head.kernel.shape == (32, 50)
    assert not hasattr(nnx.eval_shape(lambda: _build(tie_word_embeddings=True)), "lm_head")


# ---- forward semantics ----------------------------------------------------------------------------------
# Shapes are shared between tests ([3, 72] chunked, [3, 20] recurrent) so each compiles once.
SEQ_LEN = {"chunked": 72, "recurrent": 20}


@pytest.mark.parametrize("impl", ["chunked", "recurrent"])
def test_logits_are_causal(impl):
    model, t = _model(impl), SEQ_LEN[impl]
    ids = _ids((3, t))
    cut = t - 5
    changed = ids.at[:, cut:].set((ids[:, cut:] + 7) % TINY["vocab_size"])
    a, b = _logits(model, ids), _logits(model, changed)
    assert a.shape == (3, t, 50) and a.dtype == jnp.float32
    np.testing.assert_allclose(a[:, :cut], b[:, :cut], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[:, cut:], b[:, cut:], atol=1e-3)


@pytest.mark.parametrize("impl", ["chunked", "recurrent"])
def test_packed_segments_equal_separate_sequences(impl):
    model, t = _model(impl), SEQ_LEN[impl]
    lengths = {"chunked": [30, 37, 3], "recurrent": [5, 9, 3]}[impl]  # chunked: segments straddle chunk 64
    seqs = [_ids((n,), seed=i + 1) for i, n in enumerate(lengths)]
    packed = jnp.concatenate(seqs + [jnp.zeros((t - sum(lengths),), jnp.int32)])[None]
    seg = jnp.asarray(np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)]
                                     + [np.zeros(t - sum(lengths))]), jnp.int32)[None]
    # Each sequence alone in its own row, right-padded with unrelated tokens (causality keeps them out).
    alone = jnp.stack([jnp.concatenate([s, _ids((t - len(s),), seed=9)]) for s in seqs])
    got, ref = _logits(model, packed, seg), _logits(model, alone)
    start = 0
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(got[0, start:start + n], ref[i, :n], rtol=1e-4, atol=1e-4)
        start += n


@nnx.jit(static_argnums=3)
def _prefill_decode(model, ids, segment_ids, n_prompt):
    logits, cache = model.prefill(ids[:, :n_prompt], segment_ids)
    steps = []
    for t in range(n_prompt, ids.shape[1]):
        step_logits, cache = model.decode_step(ids[:, t], cache)
        steps.append(step_logits)
    return logits, jnp.stack(steps, 1)


def test_prefill_then_decode_equals_full_forward():
    model = _model("recurrent")
    ids = _ids((3, 20))
    full = _logits(model, ids)
    prompt_logits, step_logits = _prefill_decode(model, ids, None, 17)
    np.testing.assert_allclose(prompt_logits, full[:, :17], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(step_logits, full[:, 17:], rtol=1e-4, atol=1e-4)
    last, _ = model.prefill(ids[:, :17], last_only=True)
    assert last.shape == (3, full.shape[-1])
    np.testing.assert_allclose(last, prompt_logits[:, -1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mixer", ["delta", "linear"])
def test_blocks_without_mlp_decode_like_the_full_forward(mixer):
    """use_mlp=False: no mlp / mlp_norm in any block, y = h; prefill + steps still equal the forward."""
    hybrid = dict(mixer=mixer, attn={"layers": [1], "num_heads": 4})
    model = _build("recurrent", use_mlp=False, **hybrid)
    assert all(not hasattr(layer, "mlp") and not hasattr(layer, "mlp_norm") for layer in model.model.layers)
    ids = _ids((2, 12))
    full = _logits(model, ids)
    with_mlp = _logits(_build("recurrent", **hybrid), ids)
    assert not np.allclose(full, with_mlp, atol=1e-3)
    prompt_logits, step_logits = _prefill_decode(model, ids, None, 9)
    np.testing.assert_allclose(prompt_logits, full[:, :9], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(step_logits, full[:, 9:], rtol=1e-4, atol=1e-4)


def test_left_padded_prompts_decode_like_unpadded_ones():
    model = _model("chunked")
    # Prompts of 66, 6 and 40 tokens, left-padded to 66, then 3 decoded tokens each.
    lengths = [66, 6, 40]
    seqs = [_ids((n + 3,), seed=10 + i) for i, n in enumerate(lengths)]
    ids = jnp.stack([jnp.concatenate([jnp.zeros((66 - n,), jnp.int32), s]) for n, s in zip(lengths, seqs)])
    seg = jnp.asarray([[0] * (66 - n) + [1] * n for n in lengths], jnp.int32)
    prompt_logits, steps = _prefill_decode(model, ids, seg, 66)
    ref = _logits(model, jnp.stack([jnp.concatenate([s, jnp.ones((72 - len(s),), jnp.int32)]) for s in seqs]))
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(prompt_logits[i, 66 - n:], ref[i, :n], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(steps[i], ref[i, n:n + 3], rtol=1e-4, atol=1e-4)


def test_remat_wraps_blocks_without_changing_logits():
    ids = _ids((3, 20))
    plain, remat = _model("recurrent"), _model("recurrent", remat=True)
    np.testing.assert_allclose(_logits(remat, ids), _logits(plain, ids), rtol=1e-6, atol=1e-6)

    def remats(model):  # the primitive is `remat2` in JAX 0.10 and `checkpoint` in later versions
        jaxpr = str(jax.make_jaxpr(lambda m: m(ids))(model))
        return len(re.findall(r"\b(?:remat2?|checkpoint)\[", jaxpr))

    # The norms, convolutions and SwiGLU are rematerialised in both; remat adds one per block.
    assert remats(plain) > 0 and remats(remat) == remats(plain) + len(remat.model.layers)


def test_bfloat16_block_keeps_only_bfloat16_activations_for_the_backward():
    """What a bf16 block holds from forward to backward (the pullback's arrays): no float32 array of
    [B, T, hidden] or larger (norms and convolutions recompute their float32 work), and of the
    [B, T, intermediate] MLP arrays only gate_proj's and up_proj's outputs (SwiGLU recomputed)."""
    from deltanet_jax.model import DeltaNetBlock

    cfg = DeltaNetConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_heads=2)
    block = DeltaNetBlock(cfg, 0, implementation="pallas", dtype=jnp.bfloat16, param_dtype=jnp.float32,
                          rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(block)
    b, t = 2, 64
    x = jnp.ones((b, t, 64), jnp.bfloat16)
    _, pullback = jax.vjp(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
    held = [a for a in jax.tree.leaves(pullback) if a.ndim >= 2 and a.shape[:2] == (b, t)]
    wide_f32 = [a.shape for a in held if a.dtype == jnp.float32 and a.size >= b * t * 64]
    assert not wide_f32, wide_f32
    mlp = [a for a in held if a.shape == (b, t, cfg.mlp_intermediate_size)]
    assert len(mlp) == 2 and all(a.dtype == jnp.bfloat16 for a in mlp), [(a.dtype, a.shape) for a in mlp]


def test_bfloat16_compute_keeps_float32_params_and_logits():
    ids = _ids((3, 20))
    model = _model("recurrent", dtype=jnp.bfloat16)
    logits = _logits(model, ids)
    assert logits.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    np.testing.assert_allclose(logits, _logits(_model("recurrent"), ids), atol=0.02)


def test_model_rejects_bad_inputs():
    model = _model()
    with pytest.raises(ValueError, match="input_ids"):
        model(jnp.ones((2, 4), jnp.float32))
    with pytest.raises(ValueError, match="input_ids"):
        model(jnp.ones((4,), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids shape"):
        model(jnp.ones((2, 4), jnp.int32), jnp.ones((2, 5), jnp.int32))
    with pytest.raises(ValueError, match="DeltaNetConfig"):
        DeltaNetForCausalLM(dataclasses.asdict(DeltaNetConfig(**TINY)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="cache has 1 layers"):
        model.decode_step(jnp.ones((2,), jnp.int32), model.init_cache(2)[:1])


def test_matmul_params_count_the_mlp_only_when_there_is_one():
    from deltanet_jax.train.flops import matmul_params
    with_mlp, without = DeltaNetConfig(**TINY), DeltaNetConfig(**TINY, use_mlp=False)
    h, inter = TINY["hidden_size"], TINY["intermediate_size"]
    assert matmul_params(with_mlp) - matmul_params(without) == TINY["num_hidden_layers"] * 3 * h * inter


def test_linear_attention_flops_follow_its_one_chunk_form():
    from deltanet_jax.ops.linear_attention import ONE_BLOCK_MAX_LEN
    from deltanet_jax.train.flops import mixer_flops_forward
    delta, linear = DeltaNetConfig(**TINY), DeltaNetConfig(**TINY, mixer="linear")
    h, k, v, layers = 2, 16, 16, TINY["num_hidden_layers"]
    per_token = lambda c: layers * h * (2.0 * c * (3 * k + 2 * v) + 6.0 * k * v)  # noqa: E731
    assert mixer_flops_forward(linear, 256) == per_token(256) and mixer_flops_forward(delta, 256) == per_token(64)
    assert mixer_flops_forward(linear, ONE_BLOCK_MAX_LEN + 1) == per_token(64)
