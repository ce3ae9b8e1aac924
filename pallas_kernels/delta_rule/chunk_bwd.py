"""Backward pass of the chunked delta rule, in two kernels.

`chunk_state_grads`: one program per (V-tile, batch, head) walks the chunks in reverse with
`dS [K, BV]` (gradient of the state leaving the chunk) in float32:

    dV' = tril(Q K^T)^T dO + K dS,    dS <- dS + Q^T dO - W^T dV'      (Q already scaled)

and writes dV' and dS for every chunk, and the initial state's gradient.

`chunk_grads`: one program per (chunk, batch, head), all chunks in parallel, turns the recomputed
incoming states h, V', dV', dS and T = (I + A)^{-1} into dq, dk, dv, dbeta:

    dQ = dO h^T + M(dO V'^T) K,   dK = M(dO V'^T)^T Q + V' dS^T,   dW = -dV' h^T
    dT = dW (beta K)^T + dV' (beta V)^T,   dA = -T^T dT T^T   (strictly lower, same segment)
    d(beta K) = T^T dW,  d(beta V) = T^T dV',  A = diag(beta) K K^T
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.delta_rule.chunk_fwd import chunk_masks
from pallas_kernels.delta_rule.common import (CHUNK, Launch, Static, iota2, l2normalize, l2normalize_bwd,
                                              load_rows, mm)


def _state_grads_kernel(*refs, static: Static, has_dht: bool, n_chunks: int):
    q_ref, k_ref, w_ref, do_ref = refs[:4]
    pos = 4
    idx_ref = refs[pos] if static.has_segments else None
    pos += static.has_segments
    dht_ref = refs[pos] if has_dht else None
    pos += has_dht
    dv_ref, dh0_ref, dh_ref = refs[pos:pos + 3]        # [T, BV] f32, [K, BV] f32, [NT, K, BV]
    dtype = k_ref.dtype
    K, BV = dh0_ref.shape
    ds0 = dht_ref[...].astype(jnp.float32) if has_dht else jnp.zeros((K, BV), jnp.float32)

    def body(i, ds):
        c = n_chunks - 1 - i
        rows = pl.ds(c * CHUNK, CHUNK)
        q_c = load_rows(q_ref, c * CHUNK, CHUNK, static.qk_l2norm) * static.scale
        k_c = load_rows(k_ref, c * CHUNK, CHUNK, static.qk_l2norm)
        do_c = do_ref[rows, :].astype(jnp.float32)
        attend, m_in, m_last, carry = chunk_masks(idx_ref, c, static)
        dh_ref[c] = ds.astype(dh_ref.dtype)
        scores = jnp.where(attend, mm(q_c, k_c, dtype, static, "nt"), 0.0)
        kds = mm(k_c, ds, dtype, static)
        dv = mm(scores, do_c, dtype, static, "tn") + (kds if m_last is None else jnp.where(m_last, kds, 0.0))
        dv_ref[rows, :] = dv
        if m_in is not None:
            do_c, dv = jnp.where(m_in, do_c, 0.0), jnp.where(m_in, dv, 0.0)
        kept = ds if carry is None else jnp.where(carry, ds, 0.0)
        return kept + mm(q_c, do_c, dtype, static, "tn") - mm(w_ref[rows, :], dv, dtype, static, "tn")

    dh0_ref[...] = jax.lax.fori_loop(0, n_chunks, body, ds0)


@functools.partial(jax.jit, static_argnames=("static", "block_v", "launch"))
def chunk_state_grads(q, k, w, do, idx, dht, *, static: Static, block_v: int = 64,
                      launch: Launch = Launch(4, 2)):
    """q, k, w `[B, T, H, K]`, do `[B, T, H, V]`, idx `[B, T]` or None, dht `[B, H, K, V]` or None.

    Returns `(dv_new [B, T, H, V] f32, dh0 [B, H, K, V] f32, dh [B, NT, H, K, V])` where dh[:, c]
    is the gradient of the state leaving chunk c."""
    B, T, H, K = q.shape
    V = do.shape[-1]
    bv = min(block_v, V)
    nt = T // CHUNK
    seq = pl.BlockSpec((None, T, None, K), lambda j, b, h: (b, 0, h, 0))
    tile = pl.BlockSpec((None, T, None, bv), lambda j, b, h: (b, 0, h, j))
    kv = pl.BlockSpec((None, None, K, bv), lambda j, b, h: (b, h, 0, j))
    in_specs, args = [seq, seq, seq, tile], [q, k, w, do]
    if static.has_segments:
        in_specs.append(pl.BlockSpec((None, T), lambda j, b, h: (b, 0)))
        args.append(idx)
    if dht is not None:
        in_specs.append(kv)
        args.append(dht)
    h_dtype = jnp.float32 if q.dtype == jnp.float32 else q.dtype
    out_shape = (jax.ShapeDtypeStruct((B, T, H, V), jnp.float32), jax.ShapeDtypeStruct((B, H, K, V), jnp.float32),
                 jax.ShapeDtypeStruct((B, nt, H, K, V), h_dtype))
    out_specs = (tile, kv, pl.BlockSpec((None, nt, None, K, bv), lambda j, b, h: (b, 0, h, 0, j)))
    return pl.pallas_call(
        functools.partial(_state_grads_kernel, static=static, has_dht=dht is not None, n_chunks=nt),
        out_shape=out_shape, grid=(V // bv, B, H), in_specs=in_specs, out_specs=out_specs,
        interpret=static.interpret, compiler_params=launch.params(), name="delta_rule_chunk_state_grads",
    )(*args)


def _grads_kernel(*refs, static: Static, block_v: int):
    (q_ref, k_ref, v_ref, beta_ref, t_ref, vn_ref, dvn_ref, do_ref, h_ref, dh_ref) = refs[:10]
    idx_ref = refs[10] if static.has_segments else None
    dq_ref, dk_ref, dv_ref, db_ref = refs[-4:]
    dtype = k_ref.dtype
    f32 = jnp.float32
    c = pl.program_id(0)
    K, V = h_ref.shape
    q_raw = q_ref[...].astype(f32)
    k_raw = k_ref[...].astype(f32)
    if static.qk_l2norm:
        q_hat, q_rstd = l2normalize(q_raw)
        k_hat, k_rstd = l2normalize(k_raw)
    else:
        q_hat, k_hat = q_raw, k_raw
    q_c = q_hat * static.scale
    beta = beta_ref[...].astype(f32)[:, None]
    tmat = t_ref[...]
    attend, m_in, m_last, _ = chunk_masks(idx_ref, c, static)
    d_p = jnp.zeros((CHUNK, CHUNK), f32)
    dq = jnp.zeros((CHUNK, K), f32)
    dk = jnp.zeros((CHUNK, K), f32)
    dw = jnp.zeros((CHUNK, K), f32)
    dt = jnp.zeros((CHUNK, CHUNK), f32)
    db = jnp.zeros((CHUNK,), f32)
    for j in range(V // block_v):
        cols = pl.ds(j * block_v, block_v)
        do_t = do_ref[:, cols].astype(f32)
        vn_t = vn_ref[:, cols]
        dvn_t = dvn_ref[:, cols]
        h_t = h_ref[:, cols]
        v_t = v_ref[:, cols].astype(f32)
        d_p += mm(do_t, vn_t, dtype, static, "nt")
        dq += mm(do_t if m_in is None else jnp.where(m_in, do_t, 0.0), h_t, dtype, static, "nt")
        vn_last = vn_t if m_last is None else jnp.where(m_last, vn_t.astype(f32), 0.0)
        dk += mm(vn_last, dh_ref[:, cols], dtype, static, "nt")
        dw -= mm(dvn_t if m_in is None else jnp.where(m_in, dvn_t, 0.0), h_t, dtype, static, "nt")
        dt += mm(dvn_t, v_t * beta, f32, static, "nt")
        tdu = mm(tmat, dvn_t, f32, static, "tn")
        dv_ref[:, cols] = (tdu * beta).astype(dv_ref.dtype)
        db += jnp.sum(v_t * tdu, axis=1)
    d_p = jnp.where(attend, d_p, 0.0)
    dq += mm(d_p, k_hat, dtype, static)
    dk += mm(d_p, q_c, dtype, static, "tn")
    dt += mm(dw, k_hat * beta, f32, static, "nt")
    tdw = mm(tmat, dw, f32, static, "tn")
    dk += tdw * beta
    db += jnp.sum(k_hat * tdw, axis=1)
    d_a = -mm(mm(tmat, dt, f32, static, "tn"), tmat, f32, static, "nt")
    keep = iota2(CHUNK, CHUNK, 0) > iota2(CHUNK, CHUNK, 1)
    if static.has_segments:
        keep = keep & attend
    d_a = jnp.where(keep, d_a, 0.0)
    db += jnp.sum(d_a * mm(k_hat, k_hat, dtype, static, "nt"), axis=1)
    d_ab = d_a * beta
    dk += mm(d_ab, k_hat, dtype, static) + mm(d_ab, k_hat, dtype, static, "tn")
    dq = dq * static.scale
    if static.qk_l2norm:
        dq = l2normalize_bwd(q_hat, q_rstd, dq)
        dk = l2normalize_bwd(k_hat, k_rstd, dk)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    db_ref[...] = db


@functools.partial(jax.jit, static_argnames=("static", "block_v", "launch"))
def chunk_grads(q, k, v, beta, tmat, v_new, dv_new, do, h, dh, idx, *, static: Static, block_v: int = 64,
                launch: Launch = Launch(8, 2)):
    """Per-chunk gradients. q, k `[B, T, H, K]`, v, v_new, dv_new, do `[B, T, H, V]`, beta `[B, T, H]`,
    tmat `[B, T, H, 64]` f32, h, dh `[B, NT, H, K, V]`, idx `[B, T]` or None.

    Returns dq, dk `[B, T, H, K]`, dv `[B, T, H, V]` (inputs' dtype) and dbeta `[B, T, H]` f32."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    bv = min(block_v, V)
    nt = T // CHUNK
    rows = lambda d: pl.BlockSpec((None, CHUNK, None, d), lambda c, b, hh: (b, c, hh, 0))
    state = pl.BlockSpec((None, None, None, K, V), lambda c, b, hh: (b, c, hh, 0, 0))
    beta_spec = pl.BlockSpec((None, CHUNK, None), lambda c, b, hh: (b, c, hh))
    in_specs = [rows(K), rows(K), rows(V), beta_spec, rows(CHUNK), rows(V), rows(V), rows(V), state, state]
    args = [q, k, v, beta, tmat, v_new, dv_new, do, h, dh]
    if static.has_segments:
        in_specs.append(pl.BlockSpec((None, T), lambda c, b, hh: (b, 0)))
        args.append(idx)
    out_shape = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct(beta.shape, jnp.float32))
    out_specs = (rows(K), rows(K), rows(V), beta_spec)
    return pl.pallas_call(
        functools.partial(_grads_kernel, static=static, block_v=bv),
        out_shape=out_shape, grid=(nt, B, H), in_specs=in_specs, out_specs=out_specs,
        interpret=static.interpret, compiler_params=launch.params(), name="delta_rule_chunk_grads",
    )(*args)
