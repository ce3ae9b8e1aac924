"""Ground truth: the delta rule as a `lax.scan` over tokens, everything in float32 (or float64).

    S_t = S_{t-1} + k_t (beta_t (v_t - S_{t-1}^T k_t))^T,    o_t = S_t^T (scale q_t)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

L2NORM_EPS = 1e-6


def l2norm(x: jax.Array, eps: float = L2NORM_EPS) -> jax.Array:
    """`x / sqrt(sum(x^2) + eps)` over the last axis, in x's (float32 or wider) dtype."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def step(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array, state: jax.Array,
         scale: float) -> tuple[jax.Array, jax.Array]:
    """One token. q, k `[..., K]`, v `[..., V]`, beta `[...]`, state `[..., K, V]`."""
    exact = jax.lax.Precision.HIGHEST  # matrix-vector products: full float32 costs nothing here
    v_old = jnp.einsum("...kv,...k->...v", state, k, precision=exact)
    delta = beta[..., None] * (v - v_old)
    state = state + k[..., :, None] * delta[..., None, :]
    o = jnp.einsum("...kv,...k->...v", state, q * scale, precision=exact)
    return o, state


def delta_rule_recurrent(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array, scale: float,
                         initial_state: jax.Array, seg_index: jax.Array, valid: jax.Array,
                         ) -> tuple[jax.Array, jax.Array]:
    """Token-by-token scan.

    q, k `[B, T, H, K]`, v `[B, T, H, V]`, beta `[B, T, H]` (all one float dtype),
    initial_state `[B, H, K, V]`, seg_index / valid `[B, T]` (see `segments`).
    Returns o `[B, T, H, V]` and the final state `[B, H, K, V]`, in the inputs' dtype.
    """
    restart = jnp.concatenate([jnp.zeros_like(seg_index[:, :1], dtype=bool),
                               seg_index[:, 1:] != seg_index[:, :-1]], axis=1)

    def body(state, xs):
        q_t, k_t, v_t, b_t, restart_t, valid_t = xs
        state = jnp.where(restart_t[:, None, None, None], 0.0, state)
        b_t = jnp.where(valid_t[:, None], b_t, 0.0)
        o_t, state = step(q_t, k_t, v_t, b_t, state, scale)
        return state, jnp.where(valid_t[:, None, None], o_t, 0.0)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, beta, restart, valid))
    final_state, o = jax.lax.scan(body, initial_state.astype(q.dtype), xs)
    return jnp.moveaxis(o, 0, 1), final_state
