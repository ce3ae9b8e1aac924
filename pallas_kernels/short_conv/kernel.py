"""Causal depthwise convolution + activation as two Pallas kernels (forward; backward with the
weight gradient), wired with `jax.custom_vjp`.

    y[t] = act(sum_j w[j] * x[t - (W - 1) + j])         x, y [B, T, D]; w [W, D]

A tap reads input row s for output row t only if codes[s] == codes[t] >= 0 (codes [B, T] int32,
optional): packed segments restart the convolution, and rows with a negative code are padding
(their outputs are act(0)). Rows before the sequence read zero. The backward keeps only the input
and recomputes the pre-activation; it returns dx and per-tile weight-gradient partials that XLA
sums (see `conv_backward`).

The kernels read the unpadded arrays: every load is masked by the row range, and a tap's rows may
start before row 0. On a GPU the masked rows are never read. The interpreter cannot slice from a
negative start, so there (only) the input and codes get W - 1 leading rows that the same masks
exclude: `lead` shifts every row address by that much.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

ACTIVATIONS = (None, "silu")
# (rows, channels, warps) per program: the best of a sweep on an H200 at [8, 2048, 2048] and
# [8, 2048, 1024] bf16 (pallas_kernels/delta_rule/NOTES.md, "Measured 2026-12-03").
FWD_LAUNCH = (64, 128, 4)
BWD_LAUNCH = (64, 64, 4)


def _sigmoid(a: jax.Array) -> jax.Array:
    return 1.0 / (1.0 + jnp.exp(-a))


def _act(pre: jax.Array, activation: str | None) -> jax.Array:
    return pre * _sigmoid(pre) if activation == "silu" else pre


def _act_grad(pre: jax.Array, activation: str | None) -> jax.Array:
    if activation != "silu":
        return jnp.ones_like(pre)
    s = _sigmoid(pre)
    return s * (1.0 + pre * (1.0 - s))


class _Rows:
    """Masked [rows, C] loads of x (and codes) at row offsets from a tile start t0, cached per offset."""

    def __init__(self, x_ref, codes_ref, t0, rows: int, t: int, lead: int):
        self.x_ref, self.codes_ref, self.t0, self.rows, self.t, self.lead = x_ref, codes_ref, t0, rows, t, lead
        self._x, self._codes = {}, {}

    def index(self, m: int) -> jax.Array:
        return self.t0 + m + jnp.arange(self.rows)

    def inside(self, m: int) -> jax.Array:
        r = self.index(m)
        return (r >= 0) & (r < self.t)

    def x(self, m: int) -> jax.Array:
        """float32 x rows t0 + m + i (zero outside [0, T))."""
        if m not in self._x:
            ref = self.x_ref.at[pl.ds(self.t0 + m + self.lead, self.rows)]
            self._x[m] = plgpu.load(ref, mask=self.inside(m)[:, None], other=0).astype(jnp.float32)
        return self._x[m]

    def codes(self, m: int) -> jax.Array:
        """codes rows t0 + m + i (-1 outside [0, T))."""
        if m not in self._codes:
            ref = self.codes_ref.at[pl.ds(self.t0 + m + self.lead, self.rows)]
            self._codes[m] = plgpu.load(ref, mask=self.inside(m), other=-1)
        return self._codes[m]

    def feeds(self, src: int, dst: int) -> jax.Array | None:
        """[rows, 1] mask: row t0 + src + i may feed output row t0 + dst + i (None: always)."""
        if self.codes_ref is None:
            return None
        c_dst = self.codes(dst)
        return ((self.codes(src) == c_dst) & (c_dst >= 0))[:, None]


def _masked(v: jax.Array, mask: jax.Array | None) -> jax.Array:
    return v if mask is None else jnp.where(mask, v, 0.0)


def _pre(r: _Rows, w_ref, width: int) -> jax.Array:
    """float32 pre-activation [rows, C] of output rows t0 + i: tap j reads row t - (W - 1) + j."""
    pre = jnp.zeros((r.rows, w_ref.shape[-1]), jnp.float32)
    for j in range(width):
        m = j - (width - 1)
        pre = pre + _masked(r.x(m) * w_ref[j, :].astype(jnp.float32)[None, :], r.feeds(m, 0))
    return pre


def _fwd_kernel(x_ref, w_ref, *refs, width: int, rows: int, t: int, lead: int, activation, has_codes: bool):
    codes_ref = refs[0] if has_codes else None
    y_ref = refs[-1]
    t0 = pl.program_id(1) * rows
    r = _Rows(x_ref, codes_ref, t0, rows, t, lead)
    plgpu.store(y_ref.at[pl.ds(t0, rows)], _act(_pre(r, w_ref, width), activation).astype(y_ref.dtype),
                mask=r.inside(0)[:, None])


def _grad_kernel(x_ref, w_ref, dy_ref, *refs, width: int, rows: int, t: int, lead: int, activation,
                 has_codes: bool):
    """g = dy * act'(pre) for output rows t0 + i, and this tile's weight-gradient partial."""
    codes_ref = refs[0] if has_codes else None
    g_ref, dw_ref = refs[-2:]
    t0 = pl.program_id(1) * rows
    r = _Rows(x_ref, codes_ref, t0, rows, t, lead)
    pre = _pre(r, w_ref, width)
    dy = plgpu.load(dy_ref.at[pl.ds(t0, rows)], mask=r.inside(0)[:, None], other=0).astype(jnp.float32)
    g = dy * _act_grad(pre, activation)
    for j in range(width):            # dw[j] = sum over output rows s of g[s] x[s - (W - 1) + j]
        m = j - (width - 1)
        dw_ref[j, :] = jnp.sum(_masked(g * r.x(m), r.feeds(m, 0)), axis=0)
    plgpu.store(g_ref.at[pl.ds(t0, rows)], g.astype(g_ref.dtype), mask=r.inside(0)[:, None])


def _dx_kernel(g_ref, w_ref, *refs, width: int, rows: int, t: int, has_codes: bool):
    """dx[t0 + i] = sum_k w[W - 1 - k] g[t0 + i + k] over the outputs that row feeds."""
    codes_ref = refs[0] if has_codes else None
    dx_ref = refs[-1]
    t0 = pl.program_id(1) * rows
    r = _Rows(g_ref, codes_ref, t0, rows, t, 0)   # every offset here is >= 0
    dx = jnp.zeros((rows, dx_ref.shape[-1]), jnp.float32)
    for k in range(width):
        dx = dx + _masked(r.x(k) * w_ref[width - 1 - k, :].astype(jnp.float32)[None, :], r.feeds(0, k))
    plgpu.store(dx_ref.at[pl.ds(t0, rows)], dx.astype(dx_ref.dtype), mask=r.inside(0)[:, None])


def _channel_block(d: int, want: int) -> int:
    """The largest power of two <= want dividing d (d a multiple of 16)."""
    if d % 16:
        raise ValueError(f"short_conv needs a channel count divisible by 16, got {d}")
    block = want
    while d % block:
        block //= 2
    return block


def _lead(width: int, interpret: bool) -> int:
    return width - 1 if interpret else 0


def _led(a: jax.Array, lead: int, value=0) -> jax.Array:
    """a with `lead` rows of `value` in front along axis 1 (the interpreter's stand-in for masked
    loads before row 0)."""
    if lead == 0:
        return a
    widths = [(0, 0)] * a.ndim
    widths[1] = (lead, 0)
    return jnp.pad(a, widths, constant_values=value)


def _x_input(x: jax.Array, bd: int, lead: int) -> tuple[pl.BlockSpec, jax.Array]:
    """x [B, T, D] (led) as whole-T, bd-channel blocks."""
    xl = _led(x, lead)
    return pl.BlockSpec((None, xl.shape[1], bd), lambda i, n, c: (i, 0, c)), xl


def _codes_input(codes: jax.Array | None, lead: int) -> tuple[list, list]:
    """([spec], [codes [B, T] int32, led]) or ([], []) without codes: the kernels' optional last inputs."""
    if codes is None:
        return [], []
    cl = _led(codes.astype(jnp.int32), lead, value=-1)
    return [pl.BlockSpec((None, cl.shape[1]), lambda i, n, c: (i, 0))], [cl]


@functools.partial(jax.jit, static_argnames=("activation", "interpret", "launch"))
def conv_forward(x: jax.Array, weight: jax.Array, codes: jax.Array | None, *, activation: str | None,
                 interpret: bool = False, launch: tuple[int, int, int] | None = None) -> jax.Array:
    """y [B, T, D] in x's dtype from x [B, T, D], weight [W, D] and optional codes [B, T].
    `launch`: (rows, channels, warps) per program, FWD_LAUNCH if None."""
    b, t, d = x.shape
    width = weight.shape[0]
    rows, want, warps = launch or FWD_LAUNCH
    bd = _channel_block(d, want)
    lead = _lead(width, interpret)
    x_spec, xl = _x_input(x, bd, lead)
    c_specs, c_args = _codes_input(codes, lead)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, width=width, rows=rows, t=t, lead=lead, activation=activation,
                          has_codes=codes is not None),
        out_shape=jax.ShapeDtypeStruct((b, t, d), x.dtype), grid=(b, pl.cdiv(t, rows), d // bd),
        in_specs=[x_spec, pl.BlockSpec((width, bd), lambda i, n, c: (0, c)), *c_specs],
        out_specs=pl.BlockSpec((None, t, bd), lambda i, n, c: (i, 0, c)), interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1), name="short_conv_fwd",
    )(xl, weight, *c_args)


@functools.partial(jax.jit, static_argnames=("activation", "interpret", "launch"))
def conv_backward(x: jax.Array, weight: jax.Array, codes: jax.Array | None, dy: jax.Array, *,
                  activation: str | None, interpret: bool = False,
                  launch: tuple[int, int, int] | None = None) -> tuple[jax.Array, jax.Array]:
    """(dx [B, T, D] in x's dtype, dweight [W, D] float32) for y = conv_forward(x, weight, codes).

    Two kernels: the first recomputes the pre-activation and writes g = dy * act'(pre) (float32 for
    float32 inputs, else bfloat16) with per-tile weight-gradient partials; the second sums the W
    shifted rows of g into dx. A register tile cannot be shifted, so one kernel would recompute the
    pre-activation W times. `launch`: (rows, channels, warps) per program, BWD_LAUNCH if None."""
    b, t, d = x.shape
    width = weight.shape[0]
    rows, want, warps = launch or BWD_LAUNCH
    bd = _channel_block(d, want)
    lead = _lead(width, interpret)
    x_spec, xl = _x_input(x, bd, lead)
    c_specs, c_args = _codes_input(codes, lead)
    w_spec = pl.BlockSpec((width, bd), lambda i, n, c: (0, c))
    full = pl.BlockSpec((None, t, bd), lambda i, n, c: (i, 0, c))
    nt = pl.cdiv(t, rows)
    params = plgpu.CompilerParams(num_warps=warps, num_stages=1)
    g_dtype = jnp.float32 if x.dtype == jnp.float32 else jnp.bfloat16
    g, dw = pl.pallas_call(
        functools.partial(_grad_kernel, width=width, rows=rows, t=t, lead=lead, activation=activation,
                          has_codes=codes is not None),
        out_shape=(jax.ShapeDtypeStruct((b, t, d), g_dtype), jax.ShapeDtypeStruct((b, nt, width, d), jnp.float32)),
        grid=(b, nt, d // bd), in_specs=[x_spec, w_spec, full, *c_specs],
        out_specs=(full, pl.BlockSpec((None, None, width, bd), lambda i, n, c: (i, n, 0, c))),
        interpret=interpret, compiler_params=params, name="short_conv_bwd_grad",
    )(xl, weight, dy, *c_args)
    c_specs, c_args = _codes_input(codes, 0)   # the dx kernel's offsets are all >= 0
    dx = pl.pallas_call(
        functools.partial(_dx_kernel, width=width, rows=rows, t=t, has_codes=codes is not None),
        out_shape=jax.ShapeDtypeStruct((b, t, d), x.dtype), grid=(b, nt, d // bd),
        in_specs=[full, w_spec, *c_specs], out_specs=full, interpret=interpret, compiler_params=params,
        name="short_conv_bwd_dx",
    )(g, weight, *c_args)
    return dx, dw.sum(axis=(0, 1))


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
