"""WY preparation, one program per (chunk, batch, head), all chunks in parallel:

    A = tril(diag(beta) K K^T, -1)   (masked to same-segment pairs)
    T = (I + A)^{-1}                 (float32, `inverse_unit_lower64`)
    W = T (beta K),  U = T (beta V)
    P = scale * tril(Q K^T)          (masked to same-segment pairs; with Q given)

`wy_inverse` computes the same without W and U (the forward scan then makes them from T), and
`wy_apply` W, U and P from a saved T (the backward pass). A's diagonal 16x16 blocks also go
through a float32 scratch output `[B, T, H, 64]`, from which the inverse's substitution gathers its
rows (none with `doubling`: the diagonal blocks inverted by products, `diagonal_inverse_by_doubling`).

Optionally writes T (`[B, T, H, C]` in k's dtype, row-major per chunk: W and U multiply it in that
dtype anyway) for the backward pass. P is the intra-chunk attention the state scans would otherwise
recompute for every V-tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.delta_rule.common import (BLOCK, CHUNK, Launch, Static, barrier, column_blocks,
                                              inverse_unit_lower64, iota2, load_blocks, mm, total)


def intra_chunk_scores(q_ref, ks: list, idx, static: Static) -> jax.Array:
    """P = scale * (Q K^T) of one chunk, float32 `[C, C]`, zero above the diagonal and between
    tokens of different segments (`idx [C]` or None); ks the chunk's k as `load_blocks` gives it."""
    dtype = q_ref.dtype
    qs = load_blocks(q_ref, static)
    qk = total(mm(q * static.scale, k, dtype, static, "nt") for q, k in zip(qs, ks, strict=True))
    keep = iota2(CHUNK, CHUNK, 0) >= iota2(CHUNK, CHUNK, 1)
    if idx is not None:
        keep = keep & (idx[:, None] == idx[None, :])
    return jnp.where(keep, qk, 0.0)


def chunk_a(k_ref, beta_ref, idx_ref, a_ref, static: Static):
    """A = tril(diag(beta) K K^T, -1) of one chunk (masked to same-segment pairs) as one 64x64
    product, its 16x16 diagonal blocks written to the scratch `a_ref` if given (the rest of the
    scratch is never written nor read). Returns (A float32 `[C, C]`, k as `load_blocks` gives it, beta `[C, 1]`
    float32, idx or None); `invert` then needs a barrier before it reads the scratch."""
    dtype = k_ref.dtype
    ks = load_blocks(k_ref, static)
    beta = beta_ref[...].astype(jnp.float32)[:, None]
    keep = iota2(CHUNK, CHUNK, 0) > iota2(CHUNK, CHUNK, 1)
    idx = idx_ref[...] if static.has_segments else None
    if idx is not None:
        keep = keep & (idx[:, None] == idx[None, :])
    a = jnp.where(keep, total(mm(k * beta, k, dtype, static, "nt") for k in ks), 0.0)
    if a_ref is not None:
        plgpu.store(a_ref, a, mask=iota2(CHUNK, CHUNK, 0) // BLOCK == iota2(CHUNK, CHUNK, 1) // BLOCK)
    return a, ks, beta, idx


def invert(a: jax.Array, a_ref, static: Static, dtype, prefetch: bool = False, doubling: bool = False) -> jax.Array:
    """T = (I + A)^{-1} (float32 `[C, C]`) of `chunk_a`'s A (`inverse_unit_lower64`): by
    substitution, gathering from the scratch `a_ref` after a barrier that orders its writes before
    the gathers (with `prefetch`); or with `doubling` by products (`a_ref` None: no scratch, no barrier)."""
    if doubling:
        return inverse_unit_lower64(a, None, static, dtype, doubling=True)
    barrier(static)
    return inverse_unit_lower64(a, a_ref, static, dtype, prefetch)


def store_wu(w_ref, u_ref, v_ref, tmat: jax.Array, ks: list, beta: jax.Array, static: Static) -> None:
    """W = T (beta K) and U = T (beta V) of one chunk, by column blocks (ks as `load_blocks` gives
    k); tmat, W and U in the inputs' one dtype."""
    dtype = w_ref.dtype
    for cols, k in zip(column_blocks(w_ref.shape[-1], dtype), ks, strict=True):
        w_ref[:, cols] = mm(tmat, k * beta, dtype, static).astype(dtype)
    for cols in column_blocks(u_ref.shape[-1], dtype):
        u_ref[:, cols] = mm(tmat, v_ref[:, cols].astype(jnp.float32) * beta, dtype, static).astype(u_ref.dtype)


def _wy_kernel(*refs, static: Static, with_t: bool, with_p: bool, doubling: bool):
    k_ref, v_ref, beta_ref = refs[:3]
    pos = 3
    q_ref = refs[pos] if with_p else None
    pos += with_p
    idx_ref = refs[pos] if static.has_segments else None
    outs = list(refs[pos + static.has_segments:])
    w_ref, u_ref, a_ref = outs[0], outs[1], None if doubling else outs[-1]
    a, ks, beta, idx = chunk_a(k_ref, beta_ref, idx_ref, a_ref, static)
    t = invert(a, a_ref, static, k_ref.dtype, doubling=doubling).astype(k_ref.dtype)
    store_wu(w_ref, u_ref, v_ref, t, ks, beta, static)
    if with_t:
        outs[2][...] = t.astype(outs[2].dtype)
    if with_p:
        outs[2 + with_t][...] = intra_chunk_scores(q_ref, ks, idx, static).astype(outs[2 + with_t].dtype)


def _chunk_rows(d: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, CHUNK, None, d), lambda c, b, h: (b, c, h, 0))


def _scratch(B: int, T: int, H: int, doubling: bool) -> tuple[list, list]:
    """Shapes and specs of the float32 scratch output that holds A for the inverse's gathers (none
    with `doubling`)."""
    if doubling:
        return [], []
    return [jax.ShapeDtypeStruct((B, T, H, CHUNK), jnp.float32)], [_chunk_rows(CHUNK)]


@functools.partial(jax.jit, static_argnames=("static", "with_t", "launch", "doubling"))
def wy_prepare(k: jax.Array, v: jax.Array, beta: jax.Array, idx, q=None, *, static: Static,
               with_t: bool = False, launch: Launch = Launch(4, 2), doubling: bool = False):
    """k `[B, T, H, K]`, v `[B, T, H, V]`, beta `[B, T, H]`, idx `[B, T]` int32 or None, T % 64 == 0,
    q `[B, T, H, K]` or None; `doubling`: the inverse's diagonal blocks by products (`invert`).

    Returns W `[B, T, H, K]`, U `[B, T, H, V]` in k's dtype, then T `[B, T, H, 64]` in k's dtype if
    `with_t`, then P `[B, T, H, 64]` in q's dtype if q is given."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    grid = (T // CHUNK, B, H)
    in_specs = [_chunk_rows(K), _chunk_rows(V), pl.BlockSpec((None, CHUNK, None), lambda c, b, h: (b, c, h))]
    args = [k, v, beta]
    if q is not None:
        in_specs.append(_chunk_rows(K))
        args.append(q)
    if static.has_segments:
        in_specs.append(pl.BlockSpec((None, CHUNK), lambda c, b, h: (b, c)))
        args.append(idx)
    out_shape = [jax.ShapeDtypeStruct((B, T, H, K), k.dtype), jax.ShapeDtypeStruct((B, T, H, V), k.dtype)]
    out_specs = [_chunk_rows(K), _chunk_rows(V)]
    if with_t:
        out_shape.append(jax.ShapeDtypeStruct((B, T, H, CHUNK), k.dtype))
        out_specs.append(_chunk_rows(CHUNK))
    if q is not None:
        out_shape.append(jax.ShapeDtypeStruct((B, T, H, CHUNK), q.dtype))
        out_specs.append(_chunk_rows(CHUNK))
    scratch_shape, scratch_spec = _scratch(B, T, H, doubling)
    out = pl.pallas_call(
        functools.partial(_wy_kernel, static=static, with_t=with_t, with_p=q is not None, doubling=doubling),
        out_shape=(*out_shape, *scratch_shape), grid=grid, in_specs=in_specs,
        out_specs=(*out_specs, *scratch_spec),
        interpret=static.interpret, compiler_params=launch.params(), name="delta_rule_wy_prepare",
    )(*args)
    return out[:len(out_shape)]


def _wy_inverse_kernel(*refs, static: Static, with_p: bool, prefetch: bool, doubling: bool):
    k_ref, beta_ref = refs[:2]
    q_ref = refs[2] if with_p else None
    idx_ref = refs[2 + with_p] if static.has_segments else None
    outs = refs[2 + with_p + static.has_segments:]
    a_ref = None if doubling else outs[-1]
    a, ks, _, idx = chunk_a(k_ref, beta_ref, idx_ref, a_ref, static)
    if with_p:  # before the inverse, so that k's rows need not stay in registers through it
        outs[1][...] = intra_chunk_scores(q_ref, ks, idx, static).astype(outs[1].dtype)
    outs[0][...] = invert(a, a_ref, static, k_ref.dtype, prefetch, doubling).astype(outs[0].dtype)


@functools.partial(jax.jit, static_argnames=("static", "launch", "doubling"))
def wy_inverse(k: jax.Array, beta: jax.Array, idx, q=None, *, static: Static, launch: Launch = Launch(4, 1),
               doubling: bool = False):
    """T = (I + A)^{-1} per chunk alone (with P = scale tril(Q K^T) if q is given): `wy_prepare`
    without W and U, which the forward scan then makes chunk by chunk (`chunk_forward_from_t`).

    k `[B, T, H, K]`, beta `[B, T, H]`, idx `[B, T]` or None, q `[B, T, H, K]` or None, T % 64 == 0.
    Returns T `[B, T, H, 64]` in k's dtype, then P `[B, T, H, 64]` in q's dtype if q is given.
    Programs of at most 2 warps prefetch the inverse's gathers (`inverse_unit_lower64`); with
    `doubling` the diagonal blocks are inverted by products instead (no gathers, no scratch)."""
    B, T, H, K = k.shape
    in_specs = [_chunk_rows(K), pl.BlockSpec((None, CHUNK, None), lambda c, b, h: (b, c, h))]
    args = [k, beta]
    if q is not None:
        in_specs.append(_chunk_rows(K))
        args.append(q)
    if static.has_segments:
        in_specs.append(pl.BlockSpec((None, CHUNK), lambda c, b, h: (b, c)))
        args.append(idx)
    out_shape = [jax.ShapeDtypeStruct((B, T, H, CHUNK), k.dtype)]
    if q is not None:
        out_shape.append(jax.ShapeDtypeStruct((B, T, H, CHUNK), q.dtype))
    scratch_shape, scratch_spec = _scratch(B, T, H, doubling)
    out = pl.pallas_call(
        functools.partial(_wy_inverse_kernel, static=static, with_p=q is not None, prefetch=launch.num_warps <= 2,
                          doubling=doubling),
        out_shape=(*out_shape, *scratch_shape), grid=(T // CHUNK, B, H), in_specs=in_specs,
        out_specs=(*(_chunk_rows(CHUNK) for _ in out_shape), *scratch_spec),
        interpret=static.interpret, compiler_params=launch.params(), name="delta_rule_wy_inverse",
    )(*args)
    return tuple(out[:2]) if q is not None else out[0]


def _wy_apply_kernel(*refs, static: Static, with_p: bool):
    k_ref, v_ref, beta_ref, t_ref = refs[:4]
    q_ref = refs[4] if with_p else None
    idx_ref = refs[4 + with_p] if static.has_segments and with_p else None
    w_ref, u_ref = refs[-3:-1] if with_p else refs[-2:]
    beta = beta_ref[...].astype(jnp.float32)[:, None]
    ks = load_blocks(k_ref, static)
    store_wu(w_ref, u_ref, v_ref, t_ref[...], ks, beta, static)
    if with_p:
        refs[-1][...] = intra_chunk_scores(q_ref, ks, idx_ref[...] if static.has_segments else None,
                                           static).astype(refs[-1].dtype)


@functools.partial(jax.jit, static_argnames=("static", "launch"))
def wy_apply(k: jax.Array, v: jax.Array, beta: jax.Array, tmat: jax.Array, q, idx, *,
             static: Static, launch: Launch = Launch(4, 2)):
    """W = T (beta K), U = T (beta V) from T `[B, T, H, 64]` (k's dtype), and P = scale tril(Q K^T)
    if q is given: the backward pass's cheap recompute. Returns W `[B, T, H, K]`, U `[B, T, H, V]`
    in k's dtype, then P `[B, T, H, 64]` in q's dtype if q is given."""
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
