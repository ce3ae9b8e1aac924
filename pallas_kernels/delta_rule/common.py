"""Pieces shared by the delta-rule kernels: launch parameters, dots, masks, the 64x64 inverse.

Everything here runs inside Pallas kernels lowered through Triton (or in interpret mode on CPU).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

CHUNK = 64        # tokens per chunk
BLOCK = 16        # sub-block of the chunk for the triangular inverse
L2NORM_EPS = 1e-6

# Pallas warns that its Triton lowering is deprecated; we select it on purpose (DESIGN.md "Kernels").
warnings.filterwarnings("ignore", message=".*Triton lowering.*deprecated.*", category=DeprecationWarning)


@dataclasses.dataclass(frozen=True)
class Launch:
    """Static launch choices of one kernel: Triton warps and pipeline stages."""
    num_warps: int = 4
    num_stages: int = 2

    def params(self) -> plgpu.CompilerParams:
        return plgpu.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


@dataclasses.dataclass(frozen=True)
class Static:
    """Static facts about one call, shared by the forward and backward kernels."""
    scale: float
    qk_l2norm: bool
    has_segments: bool
    interpret: bool

    @property
    def precision(self):
        """Precision of float32 x float32 dots: 3xTF32 on the GPU (near-fp32), exact when interpreted."""
        return jax.lax.Precision.HIGHEST if self.interpret else jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3


def add_segments_and_state(in_specs: list, args: list, idx, state, static: Static, T: int, kv) -> None:
    """Append the state scans' optional operands (grid (V-tile, batch, head)): segment indices
    `[B, T]`, then a state `[B, H, K, V]` (the initial state, or the final state's gradient) under
    the `kv` spec."""
    if static.has_segments:
        in_specs.append(pl.BlockSpec((None, T), lambda j, b, h: (b, 0)))
        args.append(idx)
    if state is not None:
        in_specs.append(kv)
        args.append(state)


def dot(a: jax.Array, b: jax.Array, precision=None) -> jax.Array:
    """`a @ b` for 2-D operands of one dtype, accumulated in float32."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def dot_tn(a: jax.Array, b: jax.Array, precision=None) -> jax.Array:
    """`a^T @ b`, float32 accumulation."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def dot_nt(a: jax.Array, b: jax.Array, precision=None) -> jax.Array:
    """`a @ b^T`, float32 accumulation."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def mm(a: jax.Array, b: jax.Array, dtype, static: Static, kind: str = "nn") -> jax.Array:
    """Matrix product with both operands cast to the kernel's operand dtype (bf16/fp16 tensor
    cores with float32 accumulation, or float32 at `static.precision`)."""
    a, b = a.astype(dtype), b.astype(dtype)
    precision = static.precision if jnp.dtype(dtype) == jnp.float32 else None
    fn = {"nn": dot, "tn": dot_tn, "nt": dot_nt}[kind]
    return fn(a, b, precision)


def iota2(n: int, m: int, dim: int) -> jax.Array:
    return jax.lax.broadcasted_iota(jnp.int32, (n, m), dim)


def l2normalize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rows of `x [N, D]` (float32) scaled to unit norm; returns (x_hat, rstd [N, 1])."""
    rstd = jax.lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) + L2NORM_EPS)
    return x * rstd, rstd


def load_rows(ref, start: int, rows: int, normalize: bool = False) -> jax.Array:
    """Rows [start, start+rows) of a 2-D ref as float32, L2-normalised when asked."""
    x = ref[pl.ds(start, rows), :].astype(jnp.float32)
    return l2normalize(x)[0] if normalize else x


def total(terms) -> jax.Array:
    """The sum of the terms (no zero to start from: one term is that term)."""
    return functools.reduce(operator.add, terms)


def column_blocks(d: int, dtype) -> list:
    """Column slices of a chunk's `[C, d]` operand for the per-chunk products: the whole width for
    16-bit inputs; 64 wide for float32, whose 3xTF32 products of whole rows need more shared memory
    than an SM has at d = 256 (H200: `wy_prepare` asked 240 KiB, `wy_backward` 288 KiB of 227)."""
    width = d if jnp.dtype(dtype).itemsize < 4 else min(d, 64)
    return [pl.ds(c, width) for c in range(0, d, width)]


def load_blocks(ref, static: Static, with_rstd: bool = False):
    """A chunk's rows `[C, d]` of `ref` as float32 column blocks (`column_blocks`), L2-normalised
    over the whole row if `static.qk_l2norm`; with `with_rstd`, also the rows' 1 / norm `[C, 1]`
    (None without normalisation)."""
    blocks = [ref[:, cols].astype(jnp.float32) for cols in column_blocks(ref.shape[-1], ref.dtype)]
    rstd = None
    if static.qk_l2norm:
        rstd = jax.lax.rsqrt(total(jnp.sum(x * x, axis=1, keepdims=True) for x in blocks) + L2NORM_EPS)
        blocks = [x * rstd for x in blocks]
    return (blocks, rstd) if with_rstd else blocks


def l2normalize_bwd_blocks(x_hats: list, rstd: jax.Array, dx_hats: list) -> list:
    """Gradient through `l2normalize` of rows held as column blocks (`load_blocks`):
    `(dx_hat - x_hat <x_hat, dx_hat>) * rstd`, the dot over the whole row."""
    dot_rows = total(jnp.sum(x * dx, axis=1, keepdims=True) for x, dx in zip(x_hats, dx_hats, strict=True))
    return [(dx - x * dot_rows) * rstd for x, dx in zip(x_hats, dx_hats, strict=True)]


def split_dot(a: jax.Array, b: jax.Array, static: Static, dtype) -> jax.Array:
    """`a @ b` of float32 operands for the inverse's block merge, by the kernel's input `dtype`:
    exact when interpreted; for 16-bit inputs one TF32 product (T is
    rounded to 16 bits right after); for float32 inputs three bf16 products of the operands'
    high and low bf16 halves (`hi hi + hi lo + lo hi`, ~16 significant bits, fewer registers than
    3xTF32). Relative error of T against float64 over 20 random and correlated-key chunks (beta up
    to 2): TF32 8e-5 typical, 2.8e-3 worst (bf16 rounding of T: 2e-3); bf16 x3 1e-6 / 5e-5."""
    if static.interpret:
        return dot(a, b, jax.lax.Precision.HIGHEST)
    if jnp.dtype(dtype).itemsize < 4:
        return dot(a, b, jax.lax.DotAlgorithmPreset.TF32_TF32_F32)
    bf = jnp.bfloat16
    a_hi, b_hi = a.astype(bf), b.astype(bf)
    a_lo = (a - a_hi.astype(jnp.float32)).astype(bf)
    b_lo = (b - b_hi.astype(jnp.float32)).astype(bf)
    return dot(a_hi, b_hi) + (dot(a_hi, b_lo) + dot(a_lo, b_hi))


def diagonal_inverse_by_doubling(a: jax.Array, static: Static, dtype) -> jax.Array:
    """`D = blockdiag((I + A_dd)^{-1})` (float32 `[64, 64]`) of the 16x16 diagonal blocks of a strictly
    lower-triangular `A` (float32 `[64, 64]`) by recursive 2x2 block inversion, for s = 2, 4, 8:
    `D_2s = D_s - (D_s E_s) D_s` with `E_s` the lower-left s x s quadrant of A inside each 2s x 2s
    diagonal block, starting from `D_2 = I - E_1`. Six 64x64 products (`split_dot`, by the input
    `dtype`), each masked to its quadrants, instead of 15 dependent substitution steps.

    The Neumann form `(I - L)(I + L^2)(I + L^4)(I + L^8)` costs as much but is unstable: for
    correlated keys with beta in [1, 2] its powers of L grow to ~1e5 and cancel (relative error of
    T, Frobenius, worst of 20 chunks: 2e5 with TF32 products, 0.31 with bf16 x3, 4.5e-3 with exact
    float32 products; NOTES.md)."""
    rows, cols = iota2(CHUNK, CHUNK, 0), iota2(CHUNK, CHUNK, 1)

    def quadrant(s: int) -> jax.Array:       # lower-left s x s block inside each 2s x 2s diagonal block
        return (rows // (2 * s) == cols // (2 * s)) & (rows // s > cols // s)

    d = (rows == cols).astype(jnp.float32) - jnp.where(quadrant(1), a, 0.0)
    for s in (2, 4, 8):
        mask = quadrant(s)
        de = split_dot(d, jnp.where(mask, a, 0.0), static, dtype)
        d = d - jnp.where(mask, split_dot(de, d, static, dtype), 0.0)
    return d


def inverse_unit_lower64(a: jax.Array, a_ref, static: Static, dtype, prefetch: bool = False,
                         doubling: bool = False) -> jax.Array:
    """`T = (I + A)^{-1}` (float32 `[64, 64]`) of one chunk's strictly lower-triangular `A` (float32,
    in registers and, written before a barrier, in `a_ref`; `a_ref` unused with `doubling`).

    The four 16x16 diagonal blocks by forward substitution, all at once on the whole 64x64 tile:
    step i (1..15) gathers row i of every diagonal block from `a_ref` (one load, no reduction to
    extract it) and fills row i of each block of `D = blockdiag((I + A_dd)^{-1})` with one
    reduction; or, with `doubling`, by six products (`diagonal_inverse_by_doubling`). Then, with
    `N = D A_off` (A below the diagonal blocks: block strictly lower, so N^4 = 0),
    `T = (I + N)^{-1} D = D - N (D - N (D - N D))`: four 64x64 products (`split_dot`, by the
    kernel's input `dtype`). `a_ref` need only hold the diagonal blocks.

    With `prefetch` the 15 gathers are all issued before the first step (the loads then overlap
    instead of each step waiting for its own), the steps unrolled: for 2-warp programs, whose
    registers hold the gathered rows (H200, (16, 2048, 32, 64): the inverse kernel 0.73 -> 0.67 ms;
    with 4 warps the same code ran 1.8x slower).
    """
    n = CHUNK
    rows, cols = iota2(n, n, 0), iota2(n, n, 1)
    col_block = (cols // BLOCK) * BLOCK
    j = jax.lax.broadcasted_iota(jnp.int32, (n,), 0)

    def gather(i):
        return a_ref[(j // BLOCK) * BLOCK + i, j]       # g[j] = A[16 (j // 16) + i, j]

    def step(i, g, d):
        s = jnp.sum(g[:, None] * d, axis=0)             # s[c] = sum_j A[r, j] D[j, c], r = 16 (c // 16) + i
        return d - jnp.where(rows == col_block + i, s[None, :], 0.0)

    if doubling:
        d = diagonal_inverse_by_doubling(a, static, dtype)
    elif prefetch:
        d = (rows == cols).astype(jnp.float32)
        for i, g in enumerate([gather(i) for i in range(1, BLOCK)], start=1):
            d = step(i, g, d)
    else:
        d = jax.lax.fori_loop(1, BLOCK, lambda i, d: step(i, gather(i), d), (rows == cols).astype(jnp.float32))
    n_mat = split_dot(d, jnp.where(rows // BLOCK > cols // BLOCK, a, 0.0), static, dtype)
    z = split_dot(n_mat, d, static, dtype)
    z = split_dot(n_mat, d - z, static, dtype)
    z = split_dot(n_mat, d - z, static, dtype)
    return d - z


def barrier(static: Static) -> None:
    """Order a program's global-memory writes before its later reads of them (GPU; interpreted
    programs run in order)."""
    if not static.interpret:
        plgpu.debug_barrier()


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Launch choices of every kernel of one call (tile widths over V and Triton parameters)."""
    wy: Launch = Launch(4, 1)
    fwd: Launch = Launch(4, 1)
    fwd_block_v: int = 64
    states: Launch = Launch(4, 3)
    state_grads: Launch = Launch(4, 1)
    bwd_block_v: int = 64
    wy_apply: Launch = Launch(2, 1)
    dqkw: Launch = Launch(8, 1)
    dqkw_block_v: int = 64
    wy_bwd: Launch = Launch(8, 1)
    wy_bwd_block_v: int = 64
    fold_wu: bool = False           # forward scan makes W, U from T per chunk (`wy_inverse` + `chunk_forward_from_t`)
    wy_inverse: Launch = Launch(4, 1)
    doubling_inverse: bool = False  # diagonal 16x16 inverses by six products, not 15 substitution steps

    @classmethod
    def for_shape(cls, k_dim: int, v_dim: int, batch_heads: int, itemsize: int = 2) -> "KernelConfig":
        """Defaults by shape and the inputs' bytes per element. The state scans run one program per
        (batch, head, V-tile): narrower V tiles (down to 32) when few (batch, head) pairs would leave
        SMs idle (>= 128 programs, about one wave on an H100), and when the float32 state `[K, BV]`
        grows with K. With a single wave of scan programs, deeper pipelining of the chunk loads
        hides their latency (measured at (2, 8192, 16, 128): forward 0.67 -> 0.51 ms with 3 stages);
        at K = 256 three stages of the `[64, K]` loads would not fit in shared memory, nor would they
        from K = 128 with float32 inputs (272-320 KiB in `experiments.kernel_resources`), so those
        scans run unpipelined."""
        bv = 64 if k_dim <= 128 else 32
        bv = min(bv, v_dim)
        scan_bv = bv
        while scan_bv > 32 and batch_heads * (v_dim // scan_bv) < 128:
            scan_bv //= 2
        one_wave = batch_heads * (v_dim // scan_bv) <= 128
        # Per-chunk backward kernels (H100 sweeps): dqkw with 4 warps for 64-wide tiles, 8 for wider
        # ((16, 2048, 32, 64): 0.76 -> 0.55 ms with 4; (2, 8192, 16, 128): 0.61 -> 0.43 ms with 8);
        # wy_bwd with 4 (0.97 -> 0.58 and 0.36 -> 0.28 ms against 8); wy_apply with 4 at K >= 128
        # (0.21 -> 0.19 ms against 2).
        wide = max(k_dim, v_dim) > 64
        per_chunk = dict(dqkw=Launch(8 if wide else 4, 1), wy_bwd=Launch(4, 1), wy_apply=Launch(4 if wide else 2, 1),
                         dqkw_block_v=bv, wy_bwd_block_v=bv, fwd_block_v=scan_bv, bwd_block_v=scan_bv)
        if itemsize > 2 and k_dim >= 128:  # float32 folds also at K = 256, where `wy_prepare` asks 240 KiB (H200)
            return cls(fwd=Launch(4, 1), states=Launch(4, 1), state_grads=Launch(4, 1), fold_wu=True, **per_chunk)
        if k_dim >= 128:  # 16-bit inputs (float32 returned above)
            # `chunk_dqkw` loops over V tiles inside each program, so 128-wide ones make fewer, larger
            # products over the same `[64, K]` accumulators (H200, each kernel alone): at K = 256,
            # (128, 512, 2, 256), 3.25 -> 1.18 ms against 32-wide; at K = 128, 8 warps, back to back,
            # 0.392 -> 0.348 ms at (8, 2048, 16, 128) and 0.393 -> 0.327 at (2, 8192, 16, 128) against
            # 64-wide.
            per_chunk.update(dqkw_block_v=min(128, v_dim))
        if k_dim > 128:
            # `wy_bwd` at K = 256 64-wide at 8 warps (0.47 -> 0.34 ms), where 4 warps spill 3.7 KiB
            # of stack and 8 warps 0.1 KiB.
            per_chunk.update(wy_bwd=Launch(8, 1), wy_bwd_block_v=min(64, v_dim))
            return cls(fwd=Launch(4, 1), states=Launch(4, 1), state_grads=Launch(4, 1), **per_chunk)
        # The reverse scan pipelines its chunk loads like the forward ones (3 stages: 0.45 -> 0.38 ms
        # at (16, 2048, 32, 64), 0.58 -> 0.29 ms at (2, 8192, 16, 128)). The forward folds W and U
        # into its scan (H200, one run: forward 0.531 -> 0.517, 0.594 -> 0.614 and 1.307 -> 1.200 ms
        # back to back at the three benchmark shapes; NOTES.md); at K = 256 the folded scan spills
        # three times as much, so it stays with `wy_prepare`. For 16-bit inputs the folded scan
        # pipelines 3 stages also over several waves (H200, (16, 2048, 32, 64): 0.39 -> 0.24 ms)
        # and the inverse runs 2 warps with its gathers prefetched (0.79 -> 0.63 ms, NOTES.md); at
        # K = 128 it inverts the diagonal blocks by doubling at 4 warps instead (H100, the kernel alone:
        # 0.230 -> 0.172 ms at (2, 8192, 16, 128), 0.227 -> 0.195 at (8, 2048, 16, 128); at
        # (16, 2048, 32, 64) 0.618 -> 0.685, so not at K = 64).
        sixteen_bit = itemsize <= 2
        doubling = sixteen_bit and k_dim == 128
        return cls(fwd=Launch(4, 3 if one_wave or sixteen_bit else 1), state_grads=Launch(4, 3), fold_wu=True,
                   wy_inverse=Launch(2 if sixteen_bit and not doubling else 4, 1), doubling_inverse=doubling,
                   **per_chunk)
