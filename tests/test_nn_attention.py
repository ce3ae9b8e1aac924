"""Attention layer against a float64 NumPy softmax reference; KV-cache decoding; parameter layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deltanet_jax.nn.attention import Attention, segment_positions


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def _rope_np(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = pos[..., None, None] * inv
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x1 * np.sin(ang) + x2 * np.cos(ang)], -1)


def attention_numpy(layer, x, segment_ids=None):
    """Token-by-token softmax attention over explicit (segment, position) bookkeeping, float64."""
    x = np.asarray(x, np.float64)
    B, T, _ = x.shape
    H, G, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
    w = {n: np.asarray(getattr(layer, n).kernel[...], np.float64) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    seg = np.ones((B, T), np.int64) if segment_ids is None else np.asarray(segment_ids)
    out = np.zeros((B, T, H * D))
    for b in range(B):
        pos = np.zeros(T)
        ids = np.zeros(T, np.int64)  # running segment number per token
        n, cur, prev = 0, 0, None
        for t in range(T):
            if seg[b, t] != 0:
                if prev is not None and seg[b, t] != prev:
                    cur, n = cur + 1, 0
                pos[t], ids[t], prev, n = n, cur, seg[b, t], n + 1
        q = _rope_np((x[b] @ w["q_proj"]).reshape(T, H, D), pos, layer.rope_theta)
        k = _rope_np((x[b] @ w["k_proj"]).reshape(T, G, D), pos, layer.rope_theta)
        v = (x[b] @ w["v_proj"]).reshape(T, G, D)
        for t in range(T):
            if seg[b, t] == 0:
                continue
            keys = [j for j in range(t + 1) if seg[b, j] != 0 and ids[j] == ids[t]
                    and (layer.window_size is None or pos[t] - pos[j] < layer.window_size)]
            for h in range(H):
                g = h // (H // G)
                s = np.array([q[t, h] @ k[j, g] for j in keys]) / np.sqrt(D)
                p = np.exp(s - s.max())
                p /= p.sum()
                out[b, t, h * D:(h + 1) * D] = p @ v[keys, g]
    return out @ w["o_proj"]


@nnx.jit
def _step(layer, x_t, cache):
    return layer.step(x_t, cache)


@nnx.jit(static_argnames="max_length")
def _prefill(layer, x, segment_ids=None, max_length=None):
    return layer.prefill(x, segment_ids=segment_ids, max_length=max_length)


@nnx.jit
def _apply(layer, x, segment_ids=None):
    return layer(x, segment_ids=segment_ids)


def _layer(**kw):
    kw = {"hidden_size": 16, "num_heads": 4, **kw}
    return Attention(rngs=nnx.Rngs(0), kernel_init=nnx.initializers.normal(0.3), **kw)


def _x(B=2, T=11, D=16, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((B, T, D)), jnp.float32)


SEGMENTS = np.array([[0, 0, 3, 3, 3, 3, 0, 3, 4, 4, 4],
                     [1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2]], np.int32)


@pytest.mark.parametrize("kw,with_segments", [
    ({}, False), ({"num_kv_heads": 2}, True), ({"num_kv_heads": 1, "window_size": 3}, True),
    ({"window_size": 4, "rope_theta": 500.0}, False)])
def test_attention_matches_numpy(kw, with_segments):
    layer = _layer(**kw)
    x = _x()
    seg = jnp.asarray(SEGMENTS) if with_segments else None
    y = _apply(layer, x, seg)
    np.testing.assert_allclose(y, attention_numpy(layer, x, None if seg is None else SEGMENTS), rtol=1e-4, atol=1e-5)


def test_segment_positions_restart_per_segment_and_skip_padding():
    pos, _, valid = segment_positions(jnp.asarray(SEGMENTS), 2, 11)
    np.testing.assert_array_equal(pos[0], [0, 0, 0, 1, 2, 3, 3, 4, 0, 1, 2])
    np.testing.assert_array_equal(pos[1], [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3])
    np.testing.assert_array_equal(valid[0], SEGMENTS[0] != 0)


@pytest.mark.parametrize("kw", [{"num_kv_heads": 2}, {"window_size": 3}])
def test_prefill_then_steps_equal_full_attention(kw):
    layer = _layer(**kw)
    x = _x(T=12)
    full = _apply(layer, x)
    y, cache = _prefill(layer, x[:, :5], max_length=12)
    outs = [y]
    for t in range(5, 12):
        y_t, cache = _step(layer, x[:, t], cache)
        outs.append(y_t[:, None])
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-4, atol=1e-5)
    if "window_size" in kw:
        assert cache.k.shape[1] == 3  # ring buffer bounded by the window


def test_left_padded_prefill_decodes_like_the_unpadded_prompt():
    layer = _layer(window_size=4)
    x = _x(B=1, T=9)
    ref = _apply(layer, x)
    pad = jnp.concatenate([_x(B=1, T=3, seed=1), x[:, :6]], 1)
    seg = jnp.asarray([[0, 0, 0] + [1] * 6])
    y, cache = _prefill(layer, pad, seg)
    np.testing.assert_allclose(y[:, 3:], ref[:, :6], rtol=1e-4, atol=1e-5)
    for t in range(6, 9):
        y_t, cache = _step(layer, x[:, t], cache)
        np.testing.assert_allclose(y_t, ref[:, t], rtol=1e-4, atol=1e-5)


def test_parameter_names_and_shapes_follow_fla():
    layer = _layer(hidden_size=32, num_heads=4, num_kv_heads=2, qkv_bias=True)
    shapes = {"/".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(nnx.state(layer, nnx.Param))}
    assert shapes == {"q_proj/kernel": (32, 32), "q_proj/bias": (32,), "k_proj/kernel": (32, 16),
                      "k_proj/bias": (16,), "v_proj/kernel": (32, 16), "v_proj/bias": (16,),
                      "o_proj/kernel": (32, 32)}


def test_attention_rejects_bad_config_and_input():
    with pytest.raises(ValueError, match="num_kv_heads"):
        _layer(num_kv_heads=3)
    with pytest.raises(ValueError, match="divisible"):
        _layer(hidden_size=18)
    with pytest.raises(ValueError, match="window_size"):
        _layer(window_size=0)
    layer = _layer()
    with pytest.raises(ValueError, match="Attention input"):
        layer(jnp.zeros((2, 3, 8)))
    with pytest.raises(ValueError, match="segment_ids"):
        layer(_x(), segment_ids=jnp.ones((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="exceeds"):
        layer.prefill(_x(T=11), max_length=8)
    with pytest.raises(ValueError, match="cache"):
        layer.step(_x()[:, 0], layer.init_cache(3, 8))
