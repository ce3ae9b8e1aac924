"""Layer tests against NumPy references: norms, short convolution, MLP and the DeltaNet mixer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deltanet_jax.nn import (DeltaNet, GatedMLP, GatedRMSNorm, RMSNorm, ShortConvolution, causal_conv1d,
                             causal_conv1d_step, mlp_intermediate_size)

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    """GPUs default to TF32 float32 matmuls; these tests compare against float64 NumPy at 1e-4."""
    with jax.default_matmul_precision("highest"):
        yield


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _np_rmsnorm(x, w, eps):
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


# ---- norms -------------------------------------------------------------------------------------------

def test_rmsnorm_matches_numpy():
    norm = RMSNorm(16, eps=1e-5)
    norm.weight[...] = jnp.asarray(RNG.normal(size=16), jnp.float32)
    x = RNG.normal(size=(3, 5, 16)).astype(np.float32) * 3.0
    np.testing.assert_allclose(norm(jnp.asarray(x)), _np_rmsnorm(x, np.asarray(norm.weight[...]), 1e-5),
                               rtol=1e-5, atol=1e-5)


def test_rmsnorm_computes_in_float32_and_returns_compute_dtype():
    x = jnp.asarray(RNG.normal(size=(4, 64)) * 100.0, jnp.bfloat16)
    y = RMSNorm(64, dtype=jnp.bfloat16)(x)
    assert y.dtype == jnp.bfloat16
    ref = _np_rmsnorm(np.asarray(x, np.float32), np.ones(64), 1e-6)
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=1e-2, atol=1e-2)
    assert RMSNorm(64)(x).dtype == jnp.bfloat16  # no module dtype: the input's


def test_gated_rmsnorm_matches_numpy():
    norm = GatedRMSNorm(8, eps=1e-6)
    norm.weight[...] = jnp.asarray(RNG.normal(size=8), jnp.float32)
    x, g = (RNG.normal(size=(2, 3, 4, 8)).astype(np.float32) for _ in range(2))
    ref = _np_rmsnorm(x, np.asarray(norm.weight[...]), 1e-6) * _silu(g.astype(np.float64))
    np.testing.assert_allclose(norm(jnp.asarray(x), jnp.asarray(g)), ref, rtol=1e-5, atol=1e-5)


def test_norm_rejects_wrong_width():
    with pytest.raises(ValueError, match="last axis 8"):
        RMSNorm(8)(jnp.ones((2, 9)))
    with pytest.raises(ValueError, match="one shape"):
        GatedRMSNorm(8)(jnp.ones((2, 8)), jnp.ones((3, 8)))


# ---- short convolution -----------------------------------------------------------------------------

def _np_conv(x, w):
    """x [T, D], w [D, W]: y[t] = sum_j w[:, j] x[t - (W-1) + j] with zeros before 0 (no activation)."""
    t, _ = x.shape
    width = w.shape[1]
    y = np.zeros_like(x, dtype=np.float64)
    for i in range(t):
        for j in range(width):
            src = i - (width - 1) + j
            if src >= 0:
                y[i] += w[:, j] * x[src]
    return y


@nnx.jit
def _jconv(conv, x, segment_ids=None, initial_state=None):
    return conv(x, segment_ids=segment_ids, initial_state=initial_state)


def _conv(d=6, width=4, activation="silu"):
    return ShortConvolution(d, width, activation=activation, kernel_init=nnx.initializers.normal(0.5),
                            rngs=nnx.Rngs(1))


def test_short_conv_matches_numpy_loop_and_has_torch_weight_layout():
    conv = _conv()
    assert conv.weight.shape == (6, 1, 4)
    x = RNG.normal(size=(2, 9, 6)).astype(np.float32)
    y, state = _jconv(conv, jnp.asarray(x))
    w = np.asarray(conv.weight[...])[:, 0, :]
    for b in range(2):
        np.testing.assert_allclose(y[b], _silu(_np_conv(x[b], w)), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(state, x[:, -3:, :])
    y_lin, _ = _conv(activation=None)(jnp.asarray(x))
    np.testing.assert_allclose(y_lin[0], _np_conv(x[0], w), rtol=1e-5, atol=1e-5)


def test_short_conv_segments_equal_separate_sequences():
    conv = _conv()
    w = np.asarray(conv.weight[...])[:, 0, :]
    ids = np.array([[1, 1, 1, 1, 1, 2, 2, 3, 3, 3, 3, 0, 0],
                    [0, 0, 5, 5, 5, 5, 5, 5, 7, 7, 7, 7, 7]], np.int32)
    x = RNG.normal(size=(2, 13, 6)).astype(np.float32)
    y, state = _jconv(conv, jnp.asarray(x), jnp.asarray(ids))
    y = np.asarray(y)
    for b in range(2):
        for s in set(ids[b]) - {0}:
            idx = np.nonzero(ids[b] == s)[0]
            np.testing.assert_allclose(y[b, idx], _silu(_np_conv(x[b, idx], w)), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(y[b, ids[b] == 0], 0.0)
    # Final state: the last three inputs of the last segment (segment 3 has four, trailing padding skipped).
    np.testing.assert_array_equal(state[0], x[0, 8:11])
    np.testing.assert_array_equal(state[1], x[1, 10:13])


def test_short_conv_final_state_of_short_last_segment_is_zero_padded():
    x = jnp.asarray(RNG.normal(size=(1, 6, 6)), jnp.float32)
    _, state = _jconv(_conv(), x, jnp.asarray([[1, 1, 1, 1, 2, 0]]))
    np.testing.assert_array_equal(state[0, :2], 0.0)
    np.testing.assert_array_equal(state[0, 2], x[0, 4])


def test_short_conv_initial_state_continues_the_first_segment():
    conv = _conv()
    x = jnp.asarray(RNG.normal(size=(2, 10, 6)), jnp.float32)
    full, _ = _jconv(conv, x)
    _, head_state = _jconv(conv, x[:, :4])
    tail, tail_state = _jconv(conv, x[:, 4:], None, head_state)
    np.testing.assert_allclose(tail, full[:, 4:], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(tail_state, x[:, -3:])
    seg_tail, _ = _jconv(conv, x[:, 4:], jnp.ones((2, 6), jnp.int32), head_state)
    np.testing.assert_allclose(seg_tail, full[:, 4:], rtol=1e-6, atol=1e-6)


def test_short_conv_step_by_step_equals_full_convolution():
    conv = _conv()
    x = jnp.asarray(RNG.normal(size=(2, 8, 6)), jnp.float32)
    full, _ = _jconv(conv, x)
    _, state = _jconv(conv, x[:, :3])  # prefill three tokens, decode the rest
    outs = []
    for t in range(3, 8):
        y_t, state = conv.step(x[:, t], state)
        outs.append(y_t)
    np.testing.assert_allclose(jnp.stack(outs, 1), full[:, 3:], rtol=1e-6, atol=1e-6)
    state0 = conv.init_state(2)
    ys = []
    for t in range(8):
        y_t, state0 = conv.step(x[:, t], state0)
        ys.append(y_t)
    np.testing.assert_allclose(jnp.stack(ys, 1), full, rtol=1e-6, atol=1e-6)


def test_short_conv_step_is_elementwise():
    # A dot here became a 0.3 ms concatenate-and-reduce fusion per call on the GPU at batch 1.
    jaxpr = jax.make_jaxpr(causal_conv1d_step)(jnp.ones((1, 6)), jnp.ones((6, 4)), jnp.zeros((1, 3, 6)))
    assert "dot_general" not in str(jaxpr)
    y, state = causal_conv1d_step(jnp.arange(6.0)[None], jnp.ones((6, 1)), jnp.zeros((1, 0, 6)))  # kernel size 1
    np.testing.assert_array_equal(y[0], np.arange(6.0))
    assert state.shape == (1, 0, 6)


def test_short_conv_prefill_longer_than_and_shorter_than_kernel():
    x = jnp.asarray(RNG.normal(size=(1, 2, 6)), jnp.float32)
    _, state = causal_conv1d(x, jnp.ones((6, 4)))
    np.testing.assert_array_equal(state[0, 0], 0.0)
    np.testing.assert_array_equal(state[0, 1:], x[0])


def test_short_conv_rejects_bad_shapes():
    conv = _conv()
    with pytest.raises(ValueError, match="D=6"):
        conv(jnp.ones((2, 5, 7)))
    with pytest.raises(ValueError, match="segment_ids"):
        conv(jnp.ones((2, 5, 6)), segment_ids=jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="conv_state"):
        conv.step(jnp.ones((2, 6)), jnp.zeros((2, 4, 6)))


# ---- MLP ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hidden,ratio,size,want", [(2048, 4, None, 5632), (64, 4, None, 256),
                                                     (768, 4, None, 2048), (1024, 2, None, 1536),
                                                     (64, 4, 100, 100)])
def test_mlp_intermediate_size_follows_fla(hidden, ratio, size, want):
    assert mlp_intermediate_size(hidden, ratio, size) == want


def test_gated_mlp_matches_numpy():
    mlp = GatedMLP(8, intermediate_size=12, kernel_init=nnx.initializers.normal(0.5), rngs=nnx.Rngs(0))
    x = RNG.normal(size=(3, 8)).astype(np.float32)
    g, u, d = (np.asarray(p.kernel[...], np.float64) for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    ref = (_silu(x @ g) * (x @ u)) @ d
    np.testing.assert_allclose(mlp(jnp.asarray(x)), ref, rtol=1e-5, atol=1e-5)
    assert mlp.down_proj.kernel.shape == (12, 8) and mlp.gate_proj.bias is None


# ---- DeltaNet layer ------------------------------------------------------------------------------------

def _np_deltanet(layer: DeltaNet, x: np.ndarray) -> np.ndarray:
    """The fla DeltaNet layer in float64 NumPy (silu activation, l2 norm, short convs), x [T, hidden]."""
    p = lambda lin: np.asarray(lin.kernel[...], np.float64)  # noqa: E731
    cw = lambda conv: np.asarray(conv.weight[...], np.float64)[:, 0, :]  # noqa: E731
    x = x.astype(np.float64)
    t, h, dk, dv = x.shape[0], layer.num_heads, layer.head_k_dim, layer.head_v_dim
    q = _silu(_np_conv(x @ p(layer.q_proj), cw(layer.q_conv1d))).reshape(t, h, dk)
    k = _silu(_np_conv(x @ p(layer.k_proj), cw(layer.k_conv1d))).reshape(t, h, dk)
    v = _silu(_np_conv(x @ p(layer.v_proj), cw(layer.v_conv1d))).reshape(t, h, dv)
    q = q / np.sqrt(np.sum(q * q, -1, keepdims=True) + 1e-6)
    k = k / np.sqrt(np.sum(k * k, -1, keepdims=True) + 1e-6)
    beta = 1.0 / (1.0 + np.exp(-(x @ p(layer.b_proj))))
    if layer.allow_neg_eigval:
        beta = 2.0 * beta
    o = np.zeros((t, h, dv))
    for i in range(h):
        s = np.zeros((dk, dv))
        for j in range(t):
            s = s + np.outer(k[j, i], beta[j, i] * (v[j, i] - s.T @ k[j, i]))
            o[j, i] = s.T @ (q[j, i] * dk ** -0.5)
    o = _np_rmsnorm(o, np.asarray(layer.o_norm.weight[...], np.float64), layer.o_norm.eps)
    if layer.use_gate:
        o = o * _silu((x @ p(layer.g_proj)).reshape(t, h, dv))
    return o.reshape(t, h * dv) @ p(layer.o_proj)


def _layer(impl, **kw):
    return DeltaNet(16, 2, implementation=impl, kernel_init=nnx.initializers.normal(0.3), rngs=nnx.Rngs(3), **kw)


@pytest.mark.parametrize("impl", ["chunked", "recurrent"])
@pytest.mark.parametrize("kw", [{}, {"use_gate": True, "allow_neg_eigval": True}])
def test_deltanet_layer_matches_numpy(impl, kw):
    layer = _layer(impl, **kw)
    layer.o_norm.weight[...] = jnp.asarray(RNG.normal(size=8) + 1.0, jnp.float32)
    x = RNG.normal(size=(2, 11, 16)).astype(np.float32)
    y = nnx.jit(lambda m, a: m(a))(layer, jnp.asarray(x))
    for b in range(2):
        np.testing.assert_allclose(y[b], _np_deltanet(layer, x[b]), rtol=2e-4, atol=2e-4)


def test_deltanet_layer_attribute_shapes_follow_fla():
    layer = nnx.eval_shape(lambda: DeltaNet(32, 4, expand_k=0.5, expand_v=2.0, use_gate=True, rngs=nnx.Rngs(0)))
    shapes = {k: v.shape for k, v in [("q", layer.q_proj.kernel), ("k", layer.k_proj.kernel),
                                      ("v", layer.v_proj.kernel), ("b", layer.b_proj.kernel),
                                      ("g", layer.g_proj.kernel), ("o", layer.o_proj.kernel),
                                      ("qc", layer.q_conv1d.weight), ("vc", layer.v_conv1d.weight),
                                      ("on", layer.o_norm.weight)]}
    assert shapes == {"q": (32, 16), "k": (32, 16), "v": (32, 64), "b": (32, 4), "g": (32, 64), "o": (64, 32),
                      "qc": (16, 1, 4), "vc": (64, 1, 4), "on": (16,)}
    assert (layer.head_k_dim, layer.head_v_dim) == (4, 16)


@nnx.jit(static_argnums=2)
def _prefill_then_decode(layer, x, n_prompt):
    full = layer(x)
    _, cache = layer.prefill(x[:, :n_prompt])
    outs = []
    for t in range(n_prompt, x.shape[1]):
        y_t, cache = layer.step(x[:, t], cache)
        outs.append(y_t)
    return full, jnp.stack(outs, 1)


@pytest.mark.parametrize("kw", [{"qk_activation": "relu", "qk_norm": "sum"}, {"use_short_conv": False},
                                {"use_beta": False}, {"qk_activation": "elu"}])
def test_deltanet_layer_variants_decode_like_they_prefill(kw):
    layer = _layer("recurrent", **kw)
    x = jnp.asarray(RNG.normal(size=(2, 6, 16)), jnp.float32)
    if kw.get("qk_activation") == "relu":  # 'sum' normalisation needs positive feature sums
        x = jnp.abs(x)
    full, outs = _prefill_then_decode(layer, x, 4)
    np.testing.assert_allclose(outs, full[:, 4:], rtol=1e-4, atol=1e-5)
    assert outs.shape == (2, 2, 16)
    assert np.all(np.isfinite(np.asarray(full)))


def test_deltanet_layer_rejects_bad_config_and_input():
    with pytest.raises(ValueError, match="qk_norm"):
        DeltaNet(16, 2, qk_norm="l1", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="divisible"):
        DeltaNet(16, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="hidden=16"):
        _layer("recurrent")(jnp.ones((2, 3, 8)))
