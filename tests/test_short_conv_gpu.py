"""The short-convolution kernels on a GPU: bf16 against the float32 XLA convolution at fla's
tolerances (relative error <= 0.006 for outputs, <= 0.008 for gradients), float32 against it to
float32 rounding, with and without packed segments. Run with `pytest -m gpu` on a GPU machine."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deltanet_jax.nn import causal_conv1d
from deltanet_jax.nn.short_conv import conv_activate_kernel

pytestmark = pytest.mark.gpu


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _reference(x, w, seg):
    y, _ = causal_conv1d(x.astype(jnp.float32), w, segment_ids=seg)
    return jax.nn.silu(y)


@pytest.mark.parametrize("B,T,D,segments", [(8, 2048, 2048, False), (2, 4099, 1024, True), (3, 63, 48, False)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_kernel_against_the_float32_convolution(B, T, D, segments, dtype):
    rng = np.random.default_rng(B + T + D)
    x = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((D, 4)) * 0.5, jnp.float32)
    dy = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    seg = jnp.asarray(np.sort(rng.integers(0, 6, (B, T)), axis=1), jnp.int32) if segments else None
    y_ref, vjp_ref = jax.vjp(lambda x, w: _reference(x, w, seg), x, w)
    y, vjp = jax.vjp(jax.jit(lambda x, w: conv_activate_kernel(x.astype(dtype), w, seg, "silu")[0]), x, w)
    dx_ref, dw_ref = vjp_ref(dy)
    dx, dw = vjp(dy.astype(dtype))
    assert np.isfinite(np.asarray(y, np.float32)).all() and np.isfinite(np.asarray(dx, np.float32)).all()
    o_tol, g_tol = (0.006, 0.008) if dtype == jnp.bfloat16 else (1e-5, 1e-4)
    assert rel(y, y_ref) <= o_tol
    assert rel(dx, dx_ref) <= g_tol
    assert rel(dw, dw_ref) <= g_tol
