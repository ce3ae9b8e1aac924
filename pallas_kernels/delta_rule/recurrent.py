"""One decoding step of the delta rule as a Pallas kernel, one program per (V-tile, batch, head):

    S <- S + (beta k) (v - S^T k)^T,    o = scale S^T q

The state tile `S [K, BV]` (float32) is read once and written in place (the output aliases the
input state). A single token has no matrix product worth a tensor core: the kernel is two
broadcast-multiply-reduce passes over the state, bound by its memory traffic.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.delta_rule.common import Launch


def _step_kernel(q_ref, k_ref, kb_ref, v_ref, s_ref, o_ref, s_out_ref, *, scale: float):
    s = s_ref[...]                                     # [K, BV] float32
    k = k_ref[...]                                     # [K] float32
    delta = v_ref[...] - jnp.sum(k[:, None] * s, axis=0)
    s = s + kb_ref[...][:, None] * delta[None, :]
    o_ref[...] = (jnp.sum(q_ref[...][:, None] * s, axis=0) * scale).astype(o_ref.dtype)
    s_out_ref[...] = s


@functools.partial(jax.jit, static_argnames=("scale", "out_dtype", "block_v", "interpret", "launch"))
def recurrent_step(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array, state: jax.Array, *,
                   scale: float, out_dtype=jnp.float32, block_v: int = 32, interpret: bool = False,
                   launch: Launch = Launch(4, 1)) -> tuple[jax.Array, jax.Array]:
    """q, k `[B, H, K]`, v `[B, H, V]`, beta `[B, H]`, state `[B, H, K, V]` float32 (updated in
    place when the caller donates it, e.g. as the carry of a jitted decoding loop).

    K and V powers of two >= 16. Returns `(o [B, H, V] in out_dtype, new_state [B, H, K, V] f32)`."""
    B, H, K = q.shape
    V = v.shape[-1]
    bv = min(block_v, V)
    f32 = jnp.float32
    q, k, v = q.astype(f32), k.astype(f32), v.astype(f32)
    kb = k * beta.astype(f32)[..., None]
    vec = pl.BlockSpec((None, None, K), lambda j, b, h: (b, h, 0))
    tile = pl.BlockSpec((None, None, bv), lambda j, b, h: (b, h, j))
    st = pl.BlockSpec((None, None, K, bv), lambda j, b, h: (b, h, 0, j))
    return pl.pallas_call(
        functools.partial(_step_kernel, scale=scale),
        out_shape=(jax.ShapeDtypeStruct((B, H, V), out_dtype), jax.ShapeDtypeStruct((B, H, K, V), f32)),
        grid=(V // bv, B, H), in_specs=[vec, vec, vec, tile, st], out_specs=(tile, st),
        input_output_aliases={4: 1}, interpret=interpret, compiler_params=launch.params(),
        name="delta_rule_recurrent_step",
    )(q, k, kb, v, state.astype(f32))
