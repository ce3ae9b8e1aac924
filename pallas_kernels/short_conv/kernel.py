"""Causal depthwise convolution + activation as two Pallas kernels (forward; backward with the
weight gradient), wired with `jax.custom_vjp`.

    y[t] = act(sum_j w[j] * x[t - (W - 1) + j])         x, y [B, T, D]; w [W, D]

A tap reads input row s for output row t only if codes[s] == codes[t] >= 0 (codes [B, T] int32,
optional): packed segments restart the convolution, and rows with a negative code are padding
(their outputs are act(0)). Rows before the sequence read zero. The backward keeps only the padded
input and recomputes the pre-activation; it returns dx and per-tile weight-gradient partials that
XLA sums. Inputs are padded once, so every kernel load is an in-bounds slice.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

ACTIVATIONS = (None, "silu")
FWD_TILE = (64, 128)     # (rows, channels) per forward program
BWD_TILE = (32, 128)     # the backward holds several shifted tiles


def _sigmoid(a: jax.Array) -> jax.Array:
    return 1.0 / (1.0 + jnp.exp(-a))


def _act(pre: jax.Array, activation: str | None) -> jax.Array:
    return pre * _sigmoid(pre) if activation == "silu" else pre


def _act_grad(pre: jax.Array, activation: str | None) -> jax.Array:
    if activation != "silu":
        return jnp.ones_like(pre)
    s = _sigmoid(pre)
    return s * (1.0 + pre * (1.0 - s))


def _tap_ok(codes_ref, src: int, dst: int, t0, rows: int):
    """[rows, 1] mask: padded row t0 + src + i may feed output padded row t0 + dst + i."""
    c_src = codes_ref[pl.ds(t0 + src, rows)]
    c_dst = codes_ref[pl.ds(t0 + dst, rows)]
    return ((c_src == c_dst) & (c_dst >= 0))[:, None]


def _fwd_kernel(x_ref, w_ref, *refs, width: int, rows: int, activation, has_codes: bool):
    codes_ref = refs[0] if has_codes else None
    y_ref = refs[-1]
    t0 = pl.program_id(1) * rows
    pre = jnp.zeros(y_ref.shape, jnp.float32)
    for j in range(width):           # padded row t0 + i + j holds x[t0 + i - (W - 1) + j]
        tap = x_ref[pl.ds(t0 + j, rows), :].astype(jnp.float32) * w_ref[j, :].astype(jnp.float32)[None, :]
        if has_codes:
            tap = jnp.where(_tap_ok(codes_ref, j, width - 1, t0, rows), tap, 0.0)
        pre = pre + tap
    y_ref[...] = _act(pre, activation).astype(y_ref.dtype)


def _bwd_kernel(x_ref, w_ref, dy_ref, *refs, width: int, rows: int, activation, has_codes: bool):
    codes_ref = refs[0] if has_codes else None
    dx_ref, dw_ref = refs[-2:]
    t0 = pl.program_id(1) * rows
    w = [w_ref[j, :].astype(jnp.float32)[None, :] for j in range(width)]

    def xs(m):                        # padded input rows t0 + m + i
        return x_ref[pl.ds(t0 + m, rows), :].astype(jnp.float32)

    def ok(src, dst):
        return _tap_ok(codes_ref, src, dst, t0, rows) if has_codes else None

    def masked(v, mask):
        return v if mask is None else jnp.where(mask, v, 0.0)

    dx = jnp.zeros(dx_ref.shape, jnp.float32)
    for k in range(width):            # output rows t0 + k + i (padded rows t0 + k + W - 1 + i)
        out_row = k + width - 1
        pre = jnp.zeros(dx_ref.shape, jnp.float32)
        for j in range(width):
            pre = pre + masked(xs(k + j) * w[j], ok(k + j, out_row))
        g = dy_ref[pl.ds(t0 + k, rows), :].astype(jnp.float32) * _act_grad(pre, activation)
        # x row t0 + i feeds output row t0 + i + k through tap j = W - 1 - k.
        dx = dx + masked(g * w[width - 1 - k], ok(width - 1, out_row))
        if k == 0:
            for j in range(width):
                dw_ref[j, :] = jnp.sum(masked(g * xs(j), ok(j, width - 1)), axis=0)
    dx_ref[...] = dx.astype(dx_ref.dtype)


def _pad_rows(a: jax.Array, before: int, after: int, value=0) -> jax.Array:
    widths = [(0, 0)] * a.ndim
    widths[1] = (before, after)
    return jnp.pad(a, widths, constant_values=value)


def _channel_block(d: int, want: int) -> int:
    """The largest power of two <= want dividing d (d a multiple of 16)."""
    if d % 16:
        raise ValueError(f"short_conv needs a channel count divisible by 16, got {d}")
    block = want
    while d % block:
        block //= 2
    return block


def _padded_codes(codes: jax.Array, before: int, after: int) -> jax.Array:
    return _pad_rows(codes.astype(jnp.int32), before, after, value=-1)


@functools.partial(jax.jit, static_argnames=("activation", "interpret"))
def conv_forward(x: jax.Array, weight: jax.Array, codes: jax.Array | None, *, activation: str | None,
                 interpret: bool = False) -> jax.Array:
    """y [B, T, D] in x's dtype from x [B, T, D], weight [W, D] and optional codes [B, T]."""
    b, t, d = x.shape
    width = weight.shape[0]
    rows, want = FWD_TILE
    bd = _channel_block(d, want)
    tp = pl.cdiv(t, rows) * rows
    xp = _pad_rows(x, width - 1, tp - t)                      # [B, W - 1 + Tp, D]
    in_specs = [pl.BlockSpec((None, xp.shape[1], bd), lambda i, n, c: (i, 0, c)),
                pl.BlockSpec((width, bd), lambda i, n, c: (0, c))]
    args = [xp, weight]
    if codes is not None:
        in_specs.append(pl.BlockSpec((None, xp.shape[1]), lambda i, n, c: (i, 0)))
        args.append(_padded_codes(codes, width - 1, tp - t))
    y = pl.pallas_call(
        functools.partial(_fwd_kernel, width=width, rows=rows, activation=activation, has_codes=codes is not None),
        out_shape=jax.ShapeDtypeStruct((b, tp, d), x.dtype), grid=(b, tp // rows, d // bd), in_specs=in_specs,
        out_specs=pl.BlockSpec((None, rows, bd), lambda i, n, c: (i, n, c)), interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1), name="short_conv_fwd",
    )(*args)
    return y[:, :t] if tp != t else y


@functools.partial(jax.jit, static_argnames=("activation", "interpret"))
def conv_backward(x: jax.Array, weight: jax.Array, codes: jax.Array | None, dy: jax.Array, *,
                  activation: str | None, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """(dx [B, T, D] in x's dtype, dweight [W, D] float32) for y = conv_forward(x, weight, codes)."""
    b, t, d = x.shape
    width = weight.shape[0]
    rows, want = BWD_TILE
    bd = _channel_block(d, want)
    tp = pl.cdiv(t, rows) * rows
    xp = _pad_rows(x, width - 1, tp - t + width - 1)          # [B, Tp + 2 (W - 1), D]
    dyp = _pad_rows(dy, 0, tp - t + width - 1)                # [B, Tp + W - 1, D], zeros past T
    in_specs = [pl.BlockSpec((None, xp.shape[1], bd), lambda i, n, c: (i, 0, c)),
                pl.BlockSpec((width, bd), lambda i, n, c: (0, c)),
                pl.BlockSpec((None, dyp.shape[1], bd), lambda i, n, c: (i, 0, c))]
    args = [xp, weight, dyp]
    if codes is not None:
        in_specs.append(pl.BlockSpec((None, xp.shape[1]), lambda i, n, c: (i, 0)))
        args.append(_padded_codes(codes, width - 1, tp - t + width - 1))
    nt = tp // rows
    dx, dw = pl.pallas_call(
        functools.partial(_bwd_kernel, width=width, rows=rows, activation=activation, has_codes=codes is not None),
        out_shape=(jax.ShapeDtypeStruct((b, tp, d), x.dtype), jax.ShapeDtypeStruct((b, nt, width, d), jnp.float32)),
        grid=(b, nt, d // bd), in_specs=in_specs,
        out_specs=(pl.BlockSpec((None, rows, bd), lambda i, n, c: (i, n, c)),
                   pl.BlockSpec((None, None, width, bd), lambda i, n, c: (i, n, 0, c))),
        interpret=interpret, compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        name="short_conv_bwd",
    )(*args)
    return (dx[:, :t] if tp != t else dx), dw.sum(axis=(0, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def short_conv(x: jax.Array, weight: jax.Array, codes: jax.Array | None, activation: str | None = "silu",
               interpret: bool = False) -> jax.Array:
    """act(causal depthwise conv(x)): x [B, T, D] (D a multiple of 16), weight [W, D], codes [B, T]
    int32 or None (see the module docstring); y [B, T, D] in x's dtype, accumulated in float32.
    Differentiable in x and weight."""
    return conv_forward(x, weight, codes, activation=activation, interpret=interpret)


def _short_conv_fwd(x, weight, codes, activation, interpret):
    y = conv_forward(x, weight, codes, activation=activation, interpret=interpret)
    return y, (x, weight, codes)


def _short_conv_bwd(activation, interpret, res, dy):
    x, weight, codes = res
    dx, dw = conv_backward(x, weight, codes, dy, activation=activation, interpret=interpret)
    dcodes = None if codes is None else jax.numpy.zeros(codes.shape, jax.dtypes.float0)
    return dx, dw.astype(weight.dtype), dcodes


short_conv.defvjp(_short_conv_fwd, _short_conv_bwd)
