"""Inter-chunk forward pass: one program per (V-tile, batch, head) walks the chunks in order with
the state `S [K, BV]` in float32:

    V' = U - W S,   O = scale Q S + P V',   S <- S + K^T V'

where P = scale tril(Q K^T) comes precomputed per chunk (`wy_prepare` or `wy_inverse`), so no V-tile
redoes it.

With segments: tokens outside the incoming segment see S = 0, tril(Q K^T) only links tokens of one
segment, and a chunk where a segment starts passes on only its last segment's contribution.
`chunk_forward_from_t` runs the same scan making W and U from T chunk by chunk (no W, U in memory).
The same kernel, asked for `states`, recomputes for the backward pass the state entering every
chunk (`[B, NT, H, K, V]`) and V' instead of O.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.delta_rule.common import CHUNK, Launch, Static, add_segments_and_state, iota2, load_rows, mm


def chunk_masks(idx_ref, c, static: Static):
    """Masks of chunk c: (attend [C, C], m_in [C, 1], m_last [C, 1], carry scalar) or Nones."""
    causal = iota2(CHUNK, CHUNK, 0) >= iota2(CHUNK, CHUNK, 1)
    if not static.has_segments:
        return causal, None, None, None
    idx = idx_ref[pl.ds(c * CHUNK, CHUNK)]
    idx_in = jnp.where(c > 0, idx_ref[jnp.maximum(c * CHUNK - 1, 0)], 0)
    idx_last = jnp.max(idx)  # seg_index is non-decreasing
    attend = causal & (idx[:, None] == idx[None, :])
    return attend, (idx == idx_in)[:, None], (idx == idx_last)[:, None], idx_last == idx_in


def _fwd_kernel(*refs, static: Static, has_h0: bool, has_out: bool, states: bool, n_chunks: int,
                fold: bool = False):
    if fold:   # W and U made per chunk from T: refs q, k, v, beta, T in place of q, k, w, u
        q_ref, k_ref, v_ref, beta_ref, t_ref = refs[:5]
        refs = refs[:2] + (None, None) + refs[5:]
    q_ref, k_ref, w_ref, u_ref = refs[:4]
    p_ref = None if states else refs[4]
    pos = 4 + (not states)
    idx_ref = refs[pos] if static.has_segments else None
    pos += static.has_segments
    h0_ref = refs[pos] if has_h0 else None
    pos += has_h0 + has_out                            # `out` is aliased to the first output
    out_ref, last_ref = refs[pos], refs[pos + 1]       # o (or V') [T, BV]; final state [K, BV]
    h_ref = refs[pos + 2] if states else None          # [NT, K, BV]
    dtype = k_ref.dtype
    K, BV = last_ref.shape
    state0 = h0_ref[...].astype(jnp.float32) if has_h0 else jnp.zeros((K, BV), jnp.float32)

    def body(c, state):
        rows = pl.ds(c * CHUNK, CHUNK)
        k_c = load_rows(k_ref, c * CHUNK, CHUNK, static.qk_l2norm)
        _, m_in, m_last, carry = chunk_masks(idx_ref, c, static)
        if states:
            h_ref[c] = state.astype(h_ref.dtype)
        if fold:
            b_c = beta_ref[rows].astype(jnp.float32)[:, None]
            t_c = t_ref[rows, :]
            w_c = mm(t_c, k_c * b_c, dtype, static)
            u_c = mm(t_c, v_ref[rows, :].astype(jnp.float32) * b_c, dtype, static)
        else:
            w_c, u_c = w_ref[rows, :], u_ref[rows, :].astype(jnp.float32)
        ws = mm(w_c, state, dtype, static)
        v_new = u_c - (ws if m_in is None else jnp.where(m_in, ws, 0.0))
        if states:
            out_ref[rows, :] = v_new.astype(out_ref.dtype)
        else:
            q_c = load_rows(q_ref, c * CHUNK, CHUNK, static.qk_l2norm) * static.scale
            qs = mm(q_c, state, dtype, static)
            o = (qs if m_in is None else jnp.where(m_in, qs, 0.0)) + mm(p_ref[rows, :], v_new, dtype, static)
            out_ref[rows, :] = o.astype(out_ref.dtype)
        contrib = v_new if m_last is None else jnp.where(m_last, v_new, 0.0)
        kept = state if carry is None else jnp.where(carry, state, 0.0)
        return kept + mm(k_c, contrib, dtype, static, "tn")

    last_ref[...] = jax.lax.fori_loop(0, n_chunks, body, state0)


@functools.partial(jax.jit, static_argnames=("static", "states", "block_v", "launch"))
def chunk_forward(q, k, w, u, idx, h0, p=None, *, static: Static, states: bool = False, block_v: int = 64,
                  launch: Launch = Launch(4, 2), out=None):
    """q, k, w `[B, T, H, K]`, u `[B, T, H, V]` (one dtype), idx `[B, T]` int32 or None,
    h0 `[B, H, K, V]` float32 or None, p `[B, T, H, 64]` (the chunks' P, needed unless `states`);
    T % 64 == 0.

    Returns `(o [B, T, H, V], final_state [B, H, K, V] f32)`, or with `states=True`
    `(v_new [B, T, H, V], final_state, h [B, NT, H, K, V])` where h[:, c] is the state entering chunk c.
    `out`, if given, is the buffer the first result is written into (aliased to it; inside a jit
    that does not donate it, XLA copies it first); its contents are overwritten everywhere.
    """
    B, T, H, K = q.shape
    V = u.shape[-1]
    bv = min(block_v, V)
    nt = T // CHUNK
    grid = (V // bv, B, H)
    seq = lambda d: pl.BlockSpec((None, T, None, d), lambda j, b, h: (b, 0, h, 0))
    tile = pl.BlockSpec((None, T, None, bv), lambda j, b, h: (b, 0, h, j))
    kv = pl.BlockSpec((None, None, K, bv), lambda j, b, h: (b, h, 0, j))
    in_specs, args = [seq(K), seq(K), seq(K), tile], [q, k, w, u]
    if not states:
        if p is None:
            raise ValueError("chunk_forward needs the chunks' P unless states=True")
        in_specs.append(seq(CHUNK))
        args.append(p)
    add_segments_and_state(in_specs, args, idx, h0, static, T, kv)
    aliases = {}
    if out is not None:
        in_specs.append(tile)
        args.append(out)
        aliases = {len(args) - 1: 0}
    out_shape = [jax.ShapeDtypeStruct((B, T, H, V), u.dtype if states else q.dtype),
                 jax.ShapeDtypeStruct((B, H, K, V), jnp.float32)]
    out_specs = [tile, kv]
    if states:
        h_dtype = jnp.float32 if q.dtype == jnp.float32 else q.dtype
        out_shape.append(jax.ShapeDtypeStruct((B, nt, H, K, V), h_dtype))
        out_specs.append(pl.BlockSpec((None, nt, None, K, bv), lambda j, b, h: (b, 0, h, 0, j)))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, static=static, has_h0=h0 is not None, has_out=out is not None,
                          states=states, n_chunks=nt),
        out_shape=tuple(out_shape), input_output_aliases=aliases, grid=grid, in_specs=in_specs, out_specs=tuple(out_specs),
        interpret=static.interpret, compiler_params=launch.params(),
        name="delta_rule_chunk_states" if states else "delta_rule_chunk_fwd",
    )(*args)


@functools.partial(jax.jit, static_argnames=("static", "block_v", "launch"))
def chunk_forward_from_t(q, k, v, beta, tmat, idx, h0, p, *, static: Static, block_v: int = 64,
                         launch: Launch = Launch(4, 2), out=None):
    """The forward scan making W = T (beta K) and U = T (beta V) chunk by chunk from T instead of
    reading them: q, k `[B, T, H, K]`, v `[B, T, H, V]`, beta `[B, T, H]` float32, tmat and p
    `[B, T, H, 64]` (from `wy_inverse`), idx, h0 and `out` as `chunk_forward`.

    Returns `(o [B, T, H, V] in q's dtype, final_state [B, H, K, V] f32)`."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    bv = min(block_v, V)
    seq = lambda d: pl.BlockSpec((None, T, None, d), lambda j, b, h: (b, 0, h, 0))
    tile = pl.BlockSpec((None, T, None, bv), lambda j, b, h: (b, 0, h, j))
    kv = pl.BlockSpec((None, None, K, bv), lambda j, b, h: (b, h, 0, j))
    in_specs = [seq(K), seq(K), tile, pl.BlockSpec((None, T, None), lambda j, b, h: (b, 0, h)), seq(CHUNK),
                seq(CHUNK)]
    args = [q, k, v, beta, tmat, p]
    add_segments_and_state(in_specs, args, idx, h0, static, T, kv)
    aliases = {}
    if out is not None:
        in_specs.append(tile)
        args.append(out)
        aliases = {len(args) - 1: 0}
    return pl.pallas_call(
        functools.partial(_fwd_kernel, static=static, has_h0=h0 is not None, has_out=out is not None, states=False,
                          n_chunks=T // CHUNK, fold=True),
        out_shape=(jax.ShapeDtypeStruct((B, T, H, V), q.dtype), jax.ShapeDtypeStruct((B, H, K, V), jnp.float32)),
        input_output_aliases=aliases, grid=(V // bv, B, H), in_specs=in_specs, out_specs=(tile, kv),
        interpret=static.interpret, compiler_params=launch.params(), name="delta_rule_chunk_fwd_from_t",
    )(*args)
