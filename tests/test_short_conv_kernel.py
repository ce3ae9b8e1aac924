"""The Pallas short-convolution kernels (interpreted on the CPU) against the XLA convolution, and
`ShortConvolution`'s choice between them. Float32 throughout: both sides sum the same four float32
products per output in the same order, so outputs agree to float32 rounding (1e-5 relative); the
weight gradient sums B x T products in a different order (1e-4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deltanet_jax.nn import ShortConvolution, causal_conv1d
from deltanet_jax.nn.short_conv import conv_activate_kernel
from pallas_kernels.short_conv import short_conv


def _reference(x, weight, segment_ids, activation):
    y, final = causal_conv1d(x, weight, segment_ids=segment_ids)
    return (jax.nn.silu(y) if activation else y).astype(x.dtype), final


def _case(seed, B, T, D, W, segments):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((D, W)) * 0.5, jnp.float32)
    dy = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    seg = None
    if segments:  # packed rows with a padded tail (id 0) and segments as short as one token
        seg = np.sort(rng.integers(1, 5, (B, T)), axis=1)
        seg[:, -3:] = 0
        seg[0, 5] = 9 if T > 6 else seg[0, 5]
        seg = jnp.asarray(np.sort(np.where(seg == 0, 99, seg), axis=1) % 99, jnp.int32)
    return x, w, dy, seg


@pytest.mark.parametrize("B,T,D,W,segments,activation", [
    (2, 45, 48, 4, False, "silu"),     # T not a tile multiple, 16-wide channel blocks
    (1, 64, 32, 4, True, "silu"),
    (2, 37, 16, 2, True, None),
    (1, 130, 256, 3, False, None),     # several row tiles and two 128-wide channel blocks
])
def test_kernel_output_gradients_and_final_state_equal_the_xla_convolution(B, T, D, W, segments, activation):
    x, w, dy, seg = _case(B * T + D, B, T, D, W, segments)
    (y_ref, s_ref), vjp_ref = jax.vjp(lambda x, w: _reference(x, w, seg, activation), x, w)
    (y, s), vjp = jax.vjp(lambda x, w: conv_activate_kernel(x, w, seg, activation), x, w)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(s, s_ref)
    zero = jnp.zeros_like(s)
    dx_ref, dw_ref = vjp_ref((dy, zero))
    dx, dw = vjp((dy, zero))
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-4, atol=1e-4)


def test_padding_rows_give_act_zero_and_no_gradient():
    x, w, dy, _ = _case(3, 1, 20, 16, 4, False)
    codes = jnp.asarray(np.r_[np.zeros(10), -np.ones(10)][None], jnp.int32)
    y, vjp = jax.vjp(lambda x: short_conv(x, w.T, codes, "silu", True), x)
    np.testing.assert_array_equal(y[:, 10:], 0.0)
    (dx,) = vjp(dy)
    np.testing.assert_array_equal(dx[:, 10:], 0.0)


def test_bfloat16_input_accumulates_in_float32():
    x, w, dy, _ = _case(4, 2, 40, 32, 4, False)
    x16 = x.astype(jnp.bfloat16)
    y = conv_activate_kernel(x16, w, None, "silu")[0]
    y_ref = jax.nn.silu(causal_conv1d(x16.astype(jnp.float32), w)[0])
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, rtol=2 ** -8, atol=1e-6)


def test_module_chooses_the_kernel_and_falls_back_with_an_initial_state():
    pallas = ShortConvolution(32, implementation="pallas", rngs=nnx.Rngs(0))
    xla = ShortConvolution(32, implementation="xla", rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 9, 32)), jnp.float32)
    y_p, s_p = pallas(x)
    y_x, s_x = xla(x)
    np.testing.assert_allclose(y_p, y_x, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(s_p, s_x)
    jaxpr = str(jax.make_jaxpr(lambda x: pallas(x))(x))
    assert "short_conv_fwd" in jaxpr
    state = jnp.ones((2, 3, 32))
    assert "short_conv_fwd" not in str(jax.make_jaxpr(lambda x: pallas(x, initial_state=state))(x))
    np.testing.assert_allclose(pallas(x, initial_state=state)[0], xla(x, initial_state=state)[0], rtol=1e-6)


def test_bad_implementation_and_channel_count_are_rejected():
    with pytest.raises(ValueError, match="implementation"):
        ShortConvolution(32, implementation="triton", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="divisible by 16"):
        short_conv(jnp.zeros((1, 4, 20)), jnp.zeros((4, 20)), None, "silu", True)


def test_module_default_is_the_kernel_on_gpu_and_xla_elsewhere():
    conv = ShortConvolution(32, rngs=nnx.Rngs(0))
    assert conv.implementation == ("pallas" if jax.default_backend() == "gpu" else "xla")
