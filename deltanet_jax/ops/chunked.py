"""The chunked WY (Householder-product) form of the delta rule in plain XLA.

Per chunk of C tokens (DESIGN.md "Math and conventions"):

    A = tril(diag(beta) K K^T, -1),  T = (I + A)^{-1},  W = T (beta K),  U = T (beta V)
    V' = U - W S,  O = scale (Q S + tril(Q K^T) V'),  S <- S + K^T V'

With packed segments, A and tril(Q K^T) only link tokens of the same segment, tokens of a segment
that starts inside the chunk see a zero incoming state, and only the chunk's last segment carries
its contribution forward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CHUNK = 64


def _pad_time(x: jax.Array, pad: int, value=0) -> jax.Array:
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    """Every product of the reference goes through here: full float32 (on GPU the default would be
    TF32, ~1e-3 relative error, too coarse for ground truth)."""
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def unit_lower_inverse(a: jax.Array) -> jax.Array:
    """`(I + a)^{-1}` for strictly lower-triangular `a [..., C, C]` (C a power of two).

    Recursive block inversion, bottom-up: with the inverses Ai, Di of the two diagonal halves of
    every 2s x 2s diagonal block [[A, 0], [L, D]], its lower-left block is `-Di L Ai`. Each level
    is two batched products; only matrix products (no triangular solve), so it differentiates,
    batches and runs anywhere, with the stability of forward substitution.
    """
    C = a.shape[-1]
    if C & (C - 1):
        raise ValueError(f"unit_lower_inverse needs a power-of-two size, got {C}")
    lead = a.shape[:-2]
    t = jnp.broadcast_to(jnp.eye(C, dtype=a.dtype), a.shape)
    s = 1
    while s < C:
        n = C // (2 * s)

        def diag_blocks(x):  # [..., C, C] -> [..., n, 2s, 2s], the diagonal 2s x 2s blocks
            x = x.reshape(*lead, n, 2 * s, n, 2 * s)
            return jnp.moveaxis(jnp.diagonal(x, axis1=-4, axis2=-2), -1, -3)

        ab, tb = diag_blocks(a), diag_blocks(t)
        low = -_mm(_mm(tb[..., s:, s:], ab[..., s:, :s]), tb[..., :s, :s])
        tb = tb.at[..., s:, :s].set(low)
        # back to [..., C, C]: block p of the diagonal at (p, p), zeros elsewhere (no product, so exact)
        t = jnp.where(jnp.eye(n, dtype=bool)[:, None, :, None], tb[..., :, :, None, :], 0.0).reshape(a.shape)
        s *= 2
    return t


def prepare_wy(k: jax.Array, v: jax.Array, beta: jax.Array, same: jax.Array) -> tuple[jax.Array, jax.Array]:
    """W, U of every chunk. k `[..., C, K]`, v `[..., C, V]`, beta `[..., C]`,
    same `[..., C, C]` (tokens that may interact). Returns W `[..., C, K]`, U `[..., C, V]`."""
    C = k.shape[-2]
    kb = k * beta[..., None]
    strict = jnp.tril(jnp.ones((C, C), dtype=bool), -1)
    a = jnp.where(strict & same, _mm(kb, jnp.swapaxes(k, -1, -2)), 0.0)
    t = unit_lower_inverse(a)
    return _mm(t, kb), _mm(t, v * beta[..., None])


def delta_rule_chunked(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array, scale: float,
                       initial_state: jax.Array, seg_index: jax.Array, valid: jax.Array,
                       chunk: int = CHUNK) -> tuple[jax.Array, jax.Array]:
    """Same contract as `reference.delta_rule_recurrent`; any T (padded inside to a multiple of chunk)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    pad = (-T) % chunk
    N = (T + pad) // chunk
    beta = jnp.where(valid[:, :, None], beta, 0.0)
    q, k, v, beta = (_pad_time(x, pad) for x in (q, k, v, beta))
    idx = _pad_time(seg_index, pad, 0)
    if pad:
        idx = idx.at[:, T:].set(seg_index[:, -1:])

    def to_chunks(x):  # [B, N*C, H, ...] -> [N, B, H, C, ...]
        x = x.reshape(B, N, chunk, H, *x.shape[3:])
        return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 3, 2)

    qc, kc, vc = to_chunks(q), to_chunks(k), to_chunks(v)
    bc = to_chunks(beta[..., None])[..., 0]                      # [N, B, H, C]
    ic = jnp.moveaxis(idx.reshape(B, N, chunk), 1, 0)            # [N, B, C]
    idx_in = jnp.concatenate([jnp.zeros_like(ic[:1, :, 0]), ic[:-1, :, -1]], axis=0)  # [N, B]
    same = (ic[..., :, None] == ic[..., None, :])[:, :, None]    # [N, B, 1, C, C]
    causal = jnp.tril(jnp.ones((chunk, chunk), dtype=bool))
    w, u = prepare_wy(kc, vc, bc, same)
    m_in = (ic == idx_in[..., None])[:, :, None, :, None]        # [N, B, 1, C, 1]
    m_last = (ic == ic[..., -1:])[:, :, None, :, None]
    carry = (ic[..., -1] == idx_in)[:, :, None, None, None]      # [N, B, 1, 1, 1]
    attend = same & causal

    def body(state, xs):
        q_c, k_c, w_c, u_c, m_in_c, m_last_c, carry_c, attend_c = xs
        v_new = u_c - jnp.where(m_in_c, _mm(w_c, state), 0.0)
        scores = jnp.where(attend_c, _mm(q_c, jnp.swapaxes(k_c, -1, -2)), 0.0)
        o_c = scale * (jnp.where(m_in_c, _mm(q_c, state), 0.0) + _mm(scores, v_new))
        state = jnp.where(carry_c, state, 0.0) + _mm(jnp.swapaxes(k_c, -1, -2), jnp.where(m_last_c, v_new, 0.0))
        return state, o_c

    final_state, o = jax.lax.scan(body, initial_state.astype(q.dtype),
                                  (qc, kc, w, u, m_in, m_last, carry, attend))
    o = jnp.moveaxis(jnp.moveaxis(o, 2, 3), 0, 1).reshape(B, N * chunk, H, V)[:, :T]
    return jnp.where(valid[:, :, None, None], o, 0.0), final_state
