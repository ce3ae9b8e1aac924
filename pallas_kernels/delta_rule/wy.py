"""WY preparation, one program per (chunk, batch, head), all chunks in parallel:

    A = tril(diag(beta) K K^T, -1)   (masked to same-segment pairs)
    T = (I + A)^{-1}                 (float32, 16x16 forward substitution + block merge)
    W = T (beta K),  U = T (beta V)
    P = scale * tril(Q K^T)          (masked to same-segment pairs; with Q given)

`wy_inverse` + `wy_apply` compute the same in two kernels (`KernelConfig.split_wy`).

Optionally writes T (`[B, T, H, C]` in k's dtype, row-major per chunk: W and U multiply it in that
dtype anyway) for the backward pass. P is the intra-chunk attention the state scans would otherwise
recompute for every V-tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.delta_rule.common import (BLOCK, CHUNK, Launch, Static, inverse_unit_lower_blocks, iota2,
                                              load_rows, mm)


def intra_chunk_scores(q_ref, k_ref, idx, static: Static) -> jax.Array:
    """P = scale * (Q K^T) of one chunk, float32 `[C, C]`, zero above the diagonal and between
    tokens of different segments (`idx [C]` or None)."""
    q = load_rows(q_ref, 0, CHUNK, static.qk_l2norm) * static.scale
    k = load_rows(k_ref, 0, CHUNK, static.qk_l2norm)
    keep = iota2(CHUNK, CHUNK, 0) >= iota2(CHUNK, CHUNK, 1)
    if idx is not None:
        keep = keep & (idx[:, None] == idx[None, :])
    return jnp.where(keep, mm(q, k, k_ref.dtype, static, "nt"), 0.0)


def _a_blocks(k_ref, beta_ref, idx_ref, static: Static, v_ref=None, transposed_diag: bool = False):
    """The 16x16 blocks a[i, j] (i >= j, float32) of A = tril(diag(beta) K K^T, -1), masked to
    same-segment pairs (the diagonal ones as their transposes if `transposed_diag`), with the row
    blocks of beta K (and beta V if `v_ref`) in k's dtype."""
    dtype = k_ref.dtype
    n = CHUNK // BLOCK
    ks, kb, vb, idx = [], [], [], []
    for i in range(n):
        rows = pl.ds(i * BLOCK, BLOCK)
        k_i = load_rows(k_ref, i * BLOCK, BLOCK, static.qk_l2norm)
        b_i = beta_ref[rows].astype(jnp.float32)
        ks.append(k_i.astype(dtype))
        kb.append((k_i * b_i[:, None]).astype(dtype))
        if v_ref is not None:
            vb.append((v_ref[rows, :].astype(jnp.float32) * b_i[:, None]).astype(dtype))
        if static.has_segments:
            idx.append(idx_ref[rows])
    strict = iota2(BLOCK, BLOCK, 0) > iota2(BLOCK, BLOCK, 1)
    a = {}
    for i in range(n):
        for j in range(i + 1):
            if i == j and transposed_diag:  # (K_i (beta K_i)^T) = A_ii^T: strictly upper
                a_ij = mm(ks[i], kb[i], dtype, static, "nt")
                keep = iota2(BLOCK, BLOCK, 0) < iota2(BLOCK, BLOCK, 1)
            else:
                a_ij = mm(kb[i], ks[j], dtype, static, "nt")
                keep = strict if i == j else None
            if static.has_segments:
                same = idx[i][:, None] == idx[j][None, :]
                keep = same if keep is None else keep & same
            a[i, j] = a_ij if keep is None else jnp.where(keep, a_ij, 0.0)
    return a, kb, vb


def _store_t(t_ref, t: dict) -> None:
    n = CHUNK // BLOCK
    for i in range(n):
        for j in range(n):
            block = t[i, j] if j <= i else jnp.zeros((BLOCK, BLOCK), jnp.float32)
            t_ref[pl.ds(i * BLOCK, BLOCK), pl.ds(j * BLOCK, BLOCK)] = block.astype(t_ref.dtype)


def _wy_kernel(*refs, static: Static, with_t: bool, with_p: bool, transposed: bool):
    k_ref, v_ref, beta_ref = refs[:3]
    pos = 3
    q_ref = refs[pos] if with_p else None
    pos += with_p
    idx_ref = refs[pos] if static.has_segments else None
    outs = list(refs[pos + static.has_segments:])
    w_ref, u_ref = outs[:2]
    t_ref = outs[2] if with_t else None
    p_ref = outs[-1] if with_p else None
    dtype = k_ref.dtype
    n = CHUNK // BLOCK
    a, kb, vb = _a_blocks(k_ref, beta_ref, idx_ref, static, v_ref, transposed)
    t = inverse_unit_lower_blocks(a, transposed)
    for i in range(n):
        rows = pl.ds(i * BLOCK, BLOCK)
        w_i = sum(mm(t[i, j], kb[j], dtype, static) for j in range(i + 1))
        u_i = sum(mm(t[i, j], vb[j], dtype, static) for j in range(i + 1))
        w_ref[rows, :] = w_i.astype(w_ref.dtype)
        u_ref[rows, :] = u_i.astype(u_ref.dtype)
    if with_t:
        _store_t(t_ref, t)
    if with_p:
        p_ref[...] = intra_chunk_scores(q_ref, k_ref, idx_ref[...] if static.has_segments else None,
                                        static).astype(p_ref.dtype)


@functools.partial(jax.jit, static_argnames=("static", "with_t", "launch", "transposed_inverse"))
def wy_prepare(k: jax.Array, v: jax.Array, beta: jax.Array, idx, q=None, *, static: Static,
               with_t: bool = False, launch: Launch = Launch(4, 2), transposed_inverse: bool = False):
    """k `[B, T, H, K]`, v `[B, T, H, V]`, beta `[B, T, H]`, idx `[B, T]` int32 or None, T % 64 == 0,
    q `[B, T, H, K]` or None.

    Returns W `[B, T, H, K]`, U `[B, T, H, V]` in k's dtype, then T `[B, T, H, 64]` in k's dtype if
    `with_t`, then P `[B, T, H, 64]` in q's dtype if q is given."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    grid = (T // CHUNK, B, H)
    in_specs = [pl.BlockSpec((None, CHUNK, None, K), lambda c, b, h: (b, c, h, 0)),
                pl.BlockSpec((None, CHUNK, None, V), lambda c, b, h: (b, c, h, 0)),
                pl.BlockSpec((None, CHUNK, None), lambda c, b, h: (b, c, h))]
    args = [k, v, beta]
    if q is not None:
        in_specs.append(pl.BlockSpec((None, CHUNK, None, K), lambda c, b, h: (b, c, h, 0)))
        args.append(q)
    if static.has_segments:
        in_specs.append(pl.BlockSpec((None, CHUNK), lambda c, b, h: (b, c)))
        args.append(idx)
    out_shape = [jax.ShapeDtypeStruct((B, T, H, K), k.dtype), jax.ShapeDtypeStruct((B, T, H, V), k.dtype)]
    out_specs = [pl.BlockSpec((None, CHUNK, None, K), lambda c, b, h: (b, c, h, 0)),
                 pl.BlockSpec((None, CHUNK, None, V), lambda c, b, h: (b, c, h, 0))]
    if with_t:
        out_shape.append(jax.ShapeDtypeStruct((B, T, H, CHUNK), k.dtype))
        out_specs.append(pl.BlockSpec((None, CHUNK, None, CHUNK), lambda c, b, h: (b, c, h, 0)))
    if q is not None:
        out_shape.append(jax.ShapeDtypeStruct((B, T, H, CHUNK), q.dtype))
        out_specs.append(pl.BlockSpec((None, CHUNK, None, CHUNK), lambda c, b, h: (b, c, h, 0)))
    return pl.pallas_call(
        functools.partial(_wy_kernel, static=static, with_t=with_t, with_p=q is not None,
                          transposed=transposed_inverse),
        out_shape=tuple(out_shape), grid=grid, in_specs=in_specs, out_specs=tuple(out_specs),
        interpret=static.interpret, compiler_params=launch.params(), name="delta_rule_wy_prepare",
    )(*args)


def _wy_inverse_kernel(*refs, static: Static, with_p: bool, transposed: bool):
    k_ref, beta_ref = refs[:2]
    q_ref = refs[2] if with_p else None
    idx_ref = refs[2 + with_p] if static.has_segments else None
    t_ref = refs[-2] if with_p else refs[-1]
    if with_p:
        refs[-1][...] = intra_chunk_scores(q_ref, k_ref, idx_ref[...] if static.has_segments else None,
                                           static).astype(refs[-1].dtype)
    a, _, _ = _a_blocks(k_ref, beta_ref, idx_ref, static, transposed_diag=transposed)
    _store_t(t_ref, inverse_unit_lower_blocks(a, transposed))


@functools.partial(jax.jit, static_argnames=("static", "launch", "transposed_inverse"))
def wy_inverse(k: jax.Array, beta: jax.Array, idx, q=None, *, static: Static, launch: Launch = Launch(4, 1),
               transposed_inverse: bool = False):
    """T = (I + A)^{-1} per chunk alone (with P = scale tril(Q K^T) if q is given): the first half of
    `wy_prepare` split in two, with `wy_apply` making W and U. The inverse is latency-bound; without
    the `[64, K]` and `[64, V]` operands of W and U live across it, more programs fit on an SM.

    k `[B, T, H, K]`, beta `[B, T, H]`, idx `[B, T]` or None, q `[B, T, H, K]` or None, T % 64 == 0.
    Returns T `[B, T, H, 64]` in k's dtype, then P `[B, T, H, 64]` in q's dtype if q is given."""
    B, T, H, K = k.shape
    rows = lambda d: pl.BlockSpec((None, CHUNK, None, d), lambda c, b, h: (b, c, h, 0))
    in_specs = [rows(K), pl.BlockSpec((None, CHUNK, None), lambda c, b, h: (b, c, h))]
    args = [k, beta]
    if q is not None:
        in_specs.append(rows(K))
        args.append(q)
    if static.has_segments:
        in_specs.append(pl.BlockSpec((None, CHUNK), lambda c, b, h: (b, c)))
        args.append(idx)
    out_shape = [jax.ShapeDtypeStruct((B, T, H, CHUNK), k.dtype)]
    if q is not None:
        out_shape.append(jax.ShapeDtypeStruct((B, T, H, CHUNK), q.dtype))
    out = pl.pallas_call(
        functools.partial(_wy_inverse_kernel, static=static, with_p=q is not None,
                          transposed=transposed_inverse),
        out_shape=tuple(out_shape), grid=(T // CHUNK, B, H), in_specs=in_specs,
        out_specs=tuple(rows(CHUNK) for _ in out_shape),
        interpret=static.interpret, compiler_params=launch.params(), name="delta_rule_wy_inverse",
    )(*args)
    return out if q is not None else out[0]


def _wy_apply_kernel(*refs, static: Static, with_p: bool):
    k_ref, v_ref, beta_ref, t_ref = refs[:4]
    q_ref = refs[4] if with_p else None
    idx_ref = refs[4 + with_p] if static.has_segments and with_p else None
    w_ref, u_ref = refs[-3:-1] if with_p else refs[-2:]
    dtype = k_ref.dtype
    beta = beta_ref[...].astype(jnp.float32)[:, None]
    k = load_rows(k_ref, 0, CHUNK, static.qk_l2norm)
    tmat = t_ref[...]
    w_ref[...] = mm(tmat, k * beta, dtype, static).astype(w_ref.dtype)
    u_ref[...] = mm(tmat, v_ref[...].astype(jnp.float32) * beta, dtype, static).astype(u_ref.dtype)
    if with_p:
        refs[-1][...] = intra_chunk_scores(q_ref, k_ref, idx_ref[...] if static.has_segments else None,
                                           static).astype(refs[-1].dtype)


@functools.partial(jax.jit, static_argnames=("static", "launch"))
def wy_apply(k: jax.Array, v: jax.Array, beta: jax.Array, tmat: jax.Array, q, idx, *,
             static: Static, launch: Launch = Launch(4, 2)):
    """W = T (beta K), U = T (beta V) from T `[B, T, H, 64]` (k's dtype), and P = scale tril(Q K^T)
    if q is given: the backward pass's cheap recompute, and the second half of the split forward
    (`wy_inverse`). Returns W `[B, T, H, K]`, U `[B, T, H, V]` in k's dtype, then P `[B, T, H, 64]`
    in q's dtype if q is given."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    with_p = q is not None
    rows = lambda d: pl.BlockSpec((None, CHUNK, None, d), lambda c, b, h: (b, c, h, 0))
    in_specs = [rows(K), rows(V), pl.BlockSpec((None, CHUNK, None), lambda c, b, h: (b, c, h)), rows(CHUNK)]
    args = [k, v, beta, tmat]
    if with_p:
        in_specs.append(rows(K))
        args.append(q)
        if static.has_segments:  # only P needs the segments: T already carries them
            in_specs.append(pl.BlockSpec((None, CHUNK), lambda c, b, h: (b, c)))
            args.append(idx)
    out_shape = [jax.ShapeDtypeStruct((B, T, H, K), k.dtype), jax.ShapeDtypeStruct((B, T, H, V), k.dtype)]
    out_specs = [rows(K), rows(V)]
    if with_p:
        out_shape.append(jax.ShapeDtypeStruct((B, T, H, CHUNK), q.dtype))
        out_specs.append(rows(CHUNK))
    return pl.pallas_call(
        functools.partial(_wy_apply_kernel, static=static, with_p=with_p),
        out_shape=tuple(out_shape), grid=(T // CHUNK, B, H), in_specs=in_specs, out_specs=tuple(out_specs),
        interpret=static.interpret, compiler_params=launch.params(), name="delta_rule_wy_apply",
    )(*args)
