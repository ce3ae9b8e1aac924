"""`chunk_delta_rule`: the Pallas chunked delta rule with a custom VJP.

Forward: `wy_inverse` (T = (I + A)^{-1} and P = scale tril(Q K^T) per chunk, parallel) then
`chunk_forward_from_t` (the state scan, making W and U chunk by chunk from T); or, for 16-bit
inputs with K > 128, `wy_prepare` (T, W, U and P) then `chunk_forward` (KernelConfig.fold_wu). Saved for the
backward pass: the inputs and T (`[B, T, H, 64]` in the inputs' dtype: O(T * C) per head).
The backward pass recomputes W, U and P from T (`wy_apply`), the state entering each chunk and V'
(`chunk_forward(states=True)`), runs the reverse state scan (`chunk_state_grads`) and finishes with
per-chunk gradients (`chunk_dqkw`, `wy_backward`). The chunk states of the recompute live only
inside the backward pass.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.delta_rule.chunk_bwd import chunk_dqkw, chunk_state_grads, wy_backward
from pallas_kernels.delta_rule.chunk_fwd import chunk_forward, chunk_forward_from_t
from pallas_kernels.delta_rule.common import CHUNK, KernelConfig, Static
from pallas_kernels.delta_rule.wy import wy_apply, wy_inverse, wy_prepare

KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _delta_rule(q, k, v, beta, h0, idx, static: Static, config: KernelConfig):
    return _forward(q, k, v, beta, h0, idx, static, config)[0]


def _forward(q, k, v, beta, h0, idx, static, config, with_t: bool = False):
    """(o, final_state), and T (None unless `with_t` or made anyway): folded (`wy_inverse` +
    `chunk_forward_from_t`) or not (`wy_prepare` + `chunk_forward`), by `config.fold_wu`."""
    scan = dict(static=static, block_v=config.fwd_block_v, launch=config.fwd)
    if config.fold_wu:
        tmat, p = wy_inverse(k, beta, idx, q, static=static, launch=config.wy_inverse,
                             doubling=config.doubling_inverse)
        return chunk_forward_from_t(q, k, v, beta, tmat, idx, h0, p, **scan), tmat
    w, u, *rest = wy_prepare(k, v, beta, idx, q, static=static, with_t=with_t, launch=config.wy,
                             doubling=config.doubling_inverse)
    tmat, p = rest if with_t else (None, rest[0])
    return chunk_forward(q, k, w, u, idx, h0, p, **scan), tmat


def _delta_rule_fwd(q, k, v, beta, h0, idx, static, config):
    out, tmat = _forward(q, k, v, beta, h0, idx, static, config, with_t=True)
    return out, (q, k, v, beta, h0, idx, tmat)


def _delta_rule_bwd(static, config, residuals, cotangents):
    q, k, v, beta, h0, idx, tmat = residuals
    do, dht = cotangents
    do = do.astype(q.dtype)
    w, u, p = wy_apply(k, v, beta, tmat, q, idx, static=static, launch=config.wy_apply)
    v_new, _, h = chunk_forward(q, k, w, u, idx, h0, static=static, states=True,
                                block_v=config.fwd_block_v, launch=config.states)
    dv_new, dh0, dh = chunk_state_grads(q, k, w, do, p, idx, dht, static=static,
                                        block_v=config.bwd_block_v, launch=config.state_grads)
    dq, dk_partial, dw = chunk_dqkw(q, k, v_new, dv_new, do, h, dh, idx, static=static,
                                    block_v=config.dqkw_block_v, launch=config.dqkw)
    dk, dv, dbeta = wy_backward(k, v, beta, tmat, dw, dv_new, dk_partial, idx, static=static,
                                block_v=config.wy_bwd_block_v, launch=config.wy_bwd)
    return dq, dk, dv, dbeta, (None if h0 is None else dh0), None


_delta_rule.defvjp(_delta_rule_fwd, _delta_rule_bwd)


def _pow2_at_least_16(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _pad(x: jax.Array, axis: int, size: int, mode: str = "constant") -> jax.Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, mode=mode)


def chunk_delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array, *, scale: float,
                     initial_state: Optional[jax.Array] = None, seg_index: Optional[jax.Array] = None,
                     valid: Optional[jax.Array] = None, qk_l2norm: bool = False, interpret: bool = False,
                     config: Optional[KernelConfig] = None) -> tuple[jax.Array, jax.Array]:
    """The delta rule by the Pallas chunked kernels (differentiable).

    q, k `[B, T, H, K]`, v `[B, T, H, V]` (bf16, fp16 or fp32; promoted to one dtype), beta `[B, T, H]`,
    initial_state `[B, H, K, V]` or None, seg_index / valid `[B, T]` (see `deltanet_jax.ops.segments`)
    or None. Any T, K and V (padded inside to a multiple of 64 and to powers of two >= 16).
    Returns `(o [B, T, H, V] in v's dtype, final_state [B, H, K, V] float32)`.
    """
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    if dtype not in KERNEL_DTYPES:
        raise ValueError(f"the Pallas kernels take bfloat16, float16 or float32 inputs; got q {q.dtype},"
                         f" k {k.dtype}, v {v.dtype}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    Tp, Kp, Vp = -(-T // CHUNK) * CHUNK, _pow2_at_least_16(K), _pow2_at_least_16(V)
    beta = beta.astype(jnp.float32)
    if valid is not None:
        beta = jnp.where(valid[:, :, None], beta, 0.0)
    q, k = (_pad(_pad(x.astype(dtype), 1, Tp), 3, Kp) for x in (q, k))
    v = _pad(_pad(v.astype(dtype), 1, Tp), 3, Vp)
    beta = _pad(beta, 1, Tp)
    idx = None if seg_index is None else _pad(seg_index.astype(jnp.int32), 1, Tp, mode="edge")
    h0 = None if initial_state is None else _pad(_pad(initial_state.astype(jnp.float32), 2, Kp), 3, Vp)
    static = Static(scale=float(scale), qk_l2norm=qk_l2norm, has_segments=idx is not None, interpret=interpret)
    config = config or KernelConfig.for_shape(Kp, Vp, B * H, jnp.dtype(dtype).itemsize)
    o, final_state = _delta_rule(q, k, v, beta, h0, idx, static, config)
    o = o[:, :T, :, :V]
    if valid is not None:
        o = jnp.where(valid[:, :, None, None], o, 0)
    return o.astype(v.dtype), final_state[:, :, :K, :V]
