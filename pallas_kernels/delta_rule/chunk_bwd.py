"""Backward pass of the chunked delta rule, in two kernels.

`chunk_state_grads`: one program per (V-tile, batch, head) walks the chunks in reverse with
`dS [K, BV]` (gradient of the state leaving the chunk) in float32:

    dV' = P^T dO + K dS,    dS <- dS + Q^T dO - W^T dV'      (Q already scaled, P = tril(Q K^T))

and writes dV' and dS for every chunk, and the initial state's gradient.

`chunk_dqkw` then `wy_backward`: one program per (chunk, batch, head), all chunks in parallel, turn
the recomputed incoming states h, V', dV', dS and T = (I + A)^{-1} into dq, dk, dv, dbeta:

    dQ = dO h^T + M(dO V'^T) K,   dK = M(dO V'^T)^T Q + V' dS^T,   dW = -dV' h^T      (chunk_dqkw)
    dT = dW (beta K)^T + dV' (beta V)^T,   dA = -T^T dT T^T   (strictly lower, same segment)
    d(beta K) = T^T dW,  d(beta V) = T^T dV',  A = diag(beta) K K^T                  (wy_backward)

Both multiply whole rows of K for 16-bit inputs and 64-wide column blocks of K for float32
(`column_blocks`: whole rows of 3xTF32 products overflow an SM's shared memory at K = 256).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.delta_rule.chunk_fwd import chunk_masks
from pallas_kernels.delta_rule.common import (CHUNK, Launch, Static, add_segments_and_state, column_blocks, iota2,
                                              l2normalize_bwd_blocks, load_blocks, load_rows, mm, total)


def _state_grads_kernel(*refs, static: Static, has_dht: bool, n_chunks: int):
    q_ref, k_ref, w_ref, do_ref, p_ref = refs[:5]
    pos = 5
    idx_ref = refs[pos] if static.has_segments else None
    pos += static.has_segments
    dht_ref = refs[pos] if has_dht else None
    pos += has_dht
    dv_ref, dh0_ref, dh_ref = refs[pos:pos + 3]        # [T, BV], [K, BV] f32, [NT, K, BV]
    dtype = k_ref.dtype
    K, BV = dh0_ref.shape
    ds0 = dht_ref[...].astype(jnp.float32) if has_dht else jnp.zeros((K, BV), jnp.float32)

    def body(i, ds):
        c = n_chunks - 1 - i
        rows = pl.ds(c * CHUNK, CHUNK)
        q_c = load_rows(q_ref, c * CHUNK, CHUNK, static.qk_l2norm) * static.scale
        k_c = load_rows(k_ref, c * CHUNK, CHUNK, static.qk_l2norm)
        do_c = do_ref[rows, :].astype(jnp.float32)
        _, m_in, m_last, carry = chunk_masks(idx_ref, c, static)
        dh_ref[c] = ds.astype(dh_ref.dtype)
        kds = mm(k_c, ds, dtype, static)
        dv = mm(p_ref[rows, :], do_c, dtype, static, "tn") + (kds if m_last is None else jnp.where(m_last, kds, 0.0))
        dv_ref[rows, :] = dv.astype(dv_ref.dtype)
        if m_in is not None:
            do_c, dv = jnp.where(m_in, do_c, 0.0), jnp.where(m_in, dv, 0.0)
        kept = ds if carry is None else jnp.where(carry, ds, 0.0)
        return kept + mm(q_c, do_c, dtype, static, "tn") - mm(w_ref[rows, :], dv, dtype, static, "tn")

    dh0_ref[...] = jax.lax.fori_loop(0, n_chunks, body, ds0)


@functools.partial(jax.jit, static_argnames=("static", "block_v", "launch"))
def chunk_state_grads(q, k, w, do, p, idx, dht, *, static: Static, block_v: int = 64,
                      launch: Launch = Launch(4, 2)):
    """q, k, w `[B, T, H, K]`, do `[B, T, H, V]`, p `[B, T, H, 64]` (the chunks' P = scale tril(Q K^T)),
    idx `[B, T]` or None, dht `[B, H, K, V]` or None.

    Returns `(dv_new [B, T, H, V], dh0 [B, H, K, V] f32, dh [B, NT, H, K, V])` where dh[:, c] is the
    gradient of the state leaving chunk c; dv_new and dh in q's dtype (float32 for float32 inputs),
    the precision the per-chunk kernels multiply them in."""
    B, T, H, K = q.shape
    V = do.shape[-1]
    bv = min(block_v, V)
    nt = T // CHUNK
    seq = pl.BlockSpec((None, T, None, K), lambda j, b, h: (b, 0, h, 0))
    tile = pl.BlockSpec((None, T, None, bv), lambda j, b, h: (b, 0, h, j))
    kv = pl.BlockSpec((None, None, K, bv), lambda j, b, h: (b, h, 0, j))
    in_specs = [seq, seq, seq, tile, pl.BlockSpec((None, T, None, CHUNK), lambda j, b, h: (b, 0, h, 0))]
    args = [q, k, w, do, p]
    add_segments_and_state(in_specs, args, idx, dht, static, T, kv)
    h_dtype = jnp.float32 if q.dtype == jnp.float32 else q.dtype
    out_shape = (jax.ShapeDtypeStruct((B, T, H, V), h_dtype), jax.ShapeDtypeStruct((B, H, K, V), jnp.float32),
                 jax.ShapeDtypeStruct((B, nt, H, K, V), h_dtype))
    out_specs = (tile, kv, pl.BlockSpec((None, nt, None, K, bv), lambda j, b, h: (b, 0, h, 0, j)))
    return pl.pallas_call(
        functools.partial(_state_grads_kernel, static=static, has_dht=dht is not None, n_chunks=nt),
        out_shape=out_shape, grid=(V // bv, B, H), in_specs=in_specs, out_specs=out_specs,
        interpret=static.interpret, compiler_params=launch.params(), name="delta_rule_chunk_state_grads",
    )(*args)


def _dqkw_kernel(*refs, static: Static, block_v: int):
    q_ref, k_ref, vn_ref, dvn_ref, do_ref, h_ref, dh_ref = refs[:7]
    idx_ref = refs[7] if static.has_segments else None
    dq_ref, dk_ref, dw_ref = refs[-3:]
    dtype = k_ref.dtype
    f32 = jnp.float32
    K, V = h_ref.shape
    attend, m_in, m_last, _ = chunk_masks(idx_ref, pl.program_id(0), static)
    k_cols = column_blocks(K, dtype)        # one block (whole rows) for 16-bit inputs
    width = K // len(k_cols)
    if len(k_cols) > 1:                     # the rows' norms first; each block loaded where it is used
        q_rstd = load_blocks(q_ref, static, with_rstd=True)[1]
        k_rstd = load_blocks(k_ref, static, with_rstd=True)[1]
        hat = lambda ref, cols, rstd: ref[:, cols].astype(f32) if rstd is None else ref[:, cols].astype(f32) * rstd
    d_p = jnp.zeros((CHUNK, CHUNK), f32)
    dq_blocks = []
    for i, kc in enumerate(k_cols):         # dP = dO V'^T over V in the first pass
        dq = jnp.zeros((CHUNK, width), f32)
        dk = jnp.zeros((CHUNK, width), f32)
        dw = jnp.zeros((CHUNK, width), f32)
        for j in range(V // block_v):
            cols = pl.ds(j * block_v, block_v)
            do_t = do_ref[:, cols]
            vn_t = vn_ref[:, cols]
            dvn_t = dvn_ref[:, cols]
            h_t = h_ref[kc, cols]
            if i == 0:
                d_p += mm(do_t, vn_t, dtype, static, "nt")
            dq += mm(do_t if m_in is None else jnp.where(m_in, do_t, 0), h_t, dtype, static, "nt")
            dk += mm(vn_t if m_last is None else jnp.where(m_last, vn_t, 0), dh_ref[kc, cols], dtype, static, "nt")
            dw -= mm(dvn_t if m_in is None else jnp.where(m_in, dvn_t, 0.0), h_t, dtype, static, "nt")
        if i == 0:
            d_p = jnp.where(attend, d_p, 0.0)
        if len(k_cols) == 1:
            (q_hat,), q_rstd = load_blocks(q_ref, static, with_rstd=True)
            (k_hat,) = load_blocks(k_ref, static)
        else:
            q_hat, k_hat = hat(q_ref, kc, q_rstd), hat(k_ref, kc, k_rstd)
        dq = (dq + mm(d_p, k_hat, dtype, static)) * static.scale
        dk += mm(d_p, q_hat * static.scale, dtype, static, "tn")
        if static.qk_l2norm and len(k_cols) > 1:   # dq through the norm needs every block of the row
            dq_blocks.append((q_hat, dq))
        else:
            if static.qk_l2norm:
                (dq,) = l2normalize_bwd_blocks([q_hat], q_rstd, [dq])
            dq_ref[:, kc] = dq.astype(dq_ref.dtype)
        dk_ref[:, kc] = dk.astype(dk_ref.dtype)
        dw_ref[:, kc] = dw.astype(dw_ref.dtype)
    if dq_blocks:
        q_hats, dqs = (list(x) for x in zip(*dq_blocks))
        for kc, dq in zip(k_cols, l2normalize_bwd_blocks(q_hats, q_rstd, dqs), strict=True):
            dq_ref[:, kc] = dq.astype(dq_ref.dtype)


@functools.partial(jax.jit, static_argnames=("static", "block_v", "launch"))
def chunk_dqkw(q, k, v_new, dv_new, do, h, dh, idx, *, static: Static, block_v: int = 64,
               launch: Launch = Launch(8, 2)):
    """Per-chunk gradients through the state scan. q, k `[B, T, H, K]`, v_new, dv_new, do
    `[B, T, H, V]`, h, dh `[B, NT, H, K, V]`, idx `[B, T]` or None.

    Returns dq `[B, T, H, K]` (final), the partial dk (with respect to the normalised keys) and dW,
    all in q's dtype."""
    B, T, H, K = q.shape
    V = v_new.shape[-1]
    bv = min(block_v, V)
    rows = lambda d: pl.BlockSpec((None, CHUNK, None, d), lambda c, b, hh: (b, c, hh, 0))
    state = pl.BlockSpec((None, None, None, K, V), lambda c, b, hh: (b, c, hh, 0, 0))
    in_specs = [rows(K), rows(K), rows(V), rows(V), rows(V), state, state]
    args = [q, k, v_new, dv_new, do, h, dh]
    if static.has_segments:
        in_specs.append(pl.BlockSpec((None, T), lambda c, b, hh: (b, 0)))
        args.append(idx)
    out_shape = (jax.ShapeDtypeStruct(q.shape, q.dtype),) * 3
    return pl.pallas_call(
        functools.partial(_dqkw_kernel, static=static, block_v=bv),
        out_shape=out_shape, grid=(T // CHUNK, B, H), in_specs=in_specs, out_specs=(rows(K), rows(K), rows(K)),
        interpret=static.interpret, compiler_params=launch.params(), name="delta_rule_chunk_dqkw",
    )(*args)


def _wy_bwd_kernel(*refs, static: Static, block_v: int):
    k_ref, v_ref, beta_ref, t_ref, dw_ref, du_ref, dk_ref = refs[:7]
    idx_ref = refs[7] if static.has_segments else None
    dk_out, dv_out, db_out = refs[-3:]
    dtype = k_ref.dtype
    f32 = jnp.float32
    V = v_ref.shape[-1]
    beta = beta_ref[...].astype(f32)[:, None]
    tmat = t_ref[...]
    d_t = jnp.zeros((CHUNK, CHUNK), f32)
    db = jnp.zeros((CHUNK,), f32)
    for j in range(V // block_v):
        cols = pl.ds(j * block_v, block_v)
        du_t = du_ref[:, cols]
        v_t = v_ref[:, cols].astype(f32)
        d_t += mm(du_t, v_t * beta, dtype, static, "nt")
        tdu = mm(tmat, du_t, dtype, static, "tn")
        dv_out[:, cols] = (tdu * beta).astype(dv_out.dtype)
        db += jnp.sum(v_t * tdu, axis=1)
    ks, k_rstd = load_blocks(k_ref, static, with_rstd=True)      # normalised k, by column blocks
    k_cols = column_blocks(k_ref.shape[-1], dtype)
    dws = [dw_ref[:, cols] for cols in k_cols]
    d_t += total(mm(dw, k * beta, dtype, static, "nt") for dw, k in zip(dws, ks, strict=True))
    dks = []
    for cols, k, dw in zip(k_cols, ks, dws, strict=True):
        tdw = mm(tmat, dw, dtype, static, "tn")
        dks.append(dk_ref[:, cols].astype(f32) + tdw * beta)
        db += jnp.sum(k * tdw, axis=1)
    d_a = -mm(mm(tmat, d_t, dtype, static, "tn"), tmat, dtype, static, "nt")
    keep = iota2(CHUNK, CHUNK, 0) > iota2(CHUNK, CHUNK, 1)
    if static.has_segments:
        idx = idx_ref[pl.ds(pl.program_id(0) * CHUNK, CHUNK)]
        keep = keep & (idx[:, None] == idx[None, :])
    d_a = jnp.where(keep, d_a, 0.0)
    db += jnp.sum(d_a * total(mm(k, k, dtype, static, "nt") for k in ks), axis=1)
    d_ab = d_a * beta
    dks = [dk + (mm(d_ab, k, dtype, static) + mm(d_ab, k, dtype, static, "tn")) for dk, k in zip(dks, ks, strict=True)]
    if static.qk_l2norm:
        dks = l2normalize_bwd_blocks(ks, k_rstd, dks)
    for cols, dk in zip(k_cols, dks, strict=True):
        dk_out[:, cols] = dk.astype(dk_out.dtype)
    db_out[...] = db


@functools.partial(jax.jit, static_argnames=("static", "block_v", "launch"))
def wy_backward(k, v, beta, tmat, dw, du, dk_partial, idx, *, static: Static, block_v: int = 64,
                launch: Launch = Launch(4, 2)):
    """Gradients through W = T (beta K), U = T (beta V), T = (I + A)^{-1}, A = tril(diag(beta) K K^T).

    k `[B, T, H, K]`, v `[B, T, H, V]`, beta `[B, T, H]`, tmat `[B, T, H, 64]`, dw, dk_partial
    `[B, T, H, K]`, du `[B, T, H, V]`, idx `[B, T]` or None (T, dw, dk_partial and du in k's dtype,
    float32 for float32 inputs).
    Returns dk (k's dtype), dv (v's dtype) and dbeta `[B, T, H]` float32."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    bv = min(block_v, V)
    rows = lambda d: pl.BlockSpec((None, CHUNK, None, d), lambda c, b, hh: (b, c, hh, 0))
    beta_spec = pl.BlockSpec((None, CHUNK, None), lambda c, b, hh: (b, c, hh))
    in_specs = [rows(K), rows(V), beta_spec, rows(CHUNK), rows(K), rows(V), rows(K)]
    args = [k, v, beta, tmat, dw, du, dk_partial]
    if static.has_segments:
        in_specs.append(pl.BlockSpec((None, T), lambda c, b, hh: (b, 0)))
        args.append(idx)
    out_shape = (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct(beta.shape, jnp.float32))
    return pl.pallas_call(
        functools.partial(_wy_bwd_kernel, static=static, block_v=bv),
        out_shape=out_shape, grid=(T // CHUNK, B, H), in_specs=in_specs, out_specs=(rows(K), rows(V), beta_spec),
        interpret=static.interpret, compiler_params=launch.params(), name="delta_rule_wy_bwd",
    )(*args)
