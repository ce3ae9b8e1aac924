"""Public delta-rule ops: argument checks, precision policy and dispatch between implementations."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from deltanet_jax.ops import chunked, reference
from deltanet_jax.ops.segments import segment_index
from deltanet_jax.ops.validation import IMPLEMENTATIONS, check_sequence_args, check_step_args


def default_implementation() -> str:
    """"pallas" on a GPU backend, "chunked" elsewhere."""
    return "pallas" if jax.default_backend() == "gpu" else "chunked"


def _compute_dtype(*xs: jax.Array) -> jnp.dtype:
    """float64 if any input is float64, else float32: the reference paths accumulate in this."""
    return jnp.dtype(jnp.float64) if any(x.dtype == jnp.float64 for x in xs) else jnp.dtype(jnp.float32)


def delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array, *,
               scale: Optional[float] = None, initial_state: Optional[jax.Array] = None,
               output_final_state: bool = False, segment_ids: Optional[jax.Array] = None,
               qk_l2norm: bool = False, implementation: Optional[str] = None,
               ) -> tuple[jax.Array, Optional[jax.Array]]:
    """The delta rule over a sequence.

    Args:
      q, k: `[B, T, H, K]`; v: `[B, T, H, V]`; beta: `[B, T, H]` (bf16, fp16 or fp32).
      scale: multiplies q; defaults to `K ** -0.5`.
      initial_state: `[B, H, K, V]` state before the first token (zeros if None).
      output_final_state: also return the state after the last token (`[B, H, K, V]`, float32).
      segment_ids: `[B, T]` int; tokens of different segments never interact, the state restarts
        from zero at every segment start, 0 marks padding (skipped, output 0).
      qk_l2norm: L2-normalise q and k over K (eps 1e-6) before the rule.
      implementation: "recurrent", "chunked", "pallas" or None (pallas on GPU, chunked elsewhere).

    Returns:
      `(o [B, T, H, V] in v's dtype, final_state or None)`.
    """
    B, T, H, K, V = check_sequence_args(q, k, v, beta, initial_state, segment_ids)
    impl = default_implementation() if implementation is None else implementation
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}; expected one of {IMPLEMENTATIONS} or None")
    scale = K ** -0.5 if scale is None else float(scale)
    if segment_ids is None:
        seg_index = jnp.zeros((B, T), jnp.int32)
        valid = jnp.ones((B, T), bool)
    else:
        seg_index, valid = segment_index(segment_ids)

    if impl == "pallas":
        from pallas_kernels.delta_rule import chunk_delta_rule

        o, final_state = chunk_delta_rule(
            q, k, v, beta, scale=scale, initial_state=initial_state,
            seg_index=None if segment_ids is None else seg_index,
            valid=None if segment_ids is None else valid,
            qk_l2norm=qk_l2norm, interpret=jax.default_backend() != "gpu")
        return o, (final_state if output_final_state else None)

    out_dtype = v.dtype
    dtype = _compute_dtype(q, k, v, beta, *([] if initial_state is None else [initial_state]))
    q, k, v, beta = (x.astype(dtype) for x in (q, k, v, beta))
    if qk_l2norm:
        q, k = reference.l2norm(q), reference.l2norm(k)
    state0 = jnp.zeros((B, H, K, V), dtype) if initial_state is None else initial_state.astype(dtype)
    fn = reference.delta_rule_recurrent if impl == "recurrent" else chunked.delta_rule_chunked
    o, final_state = fn(q, k, v, beta, scale, state0, seg_index, valid)
    return o.astype(out_dtype), (final_state if output_final_state else None)


STEP_IMPLEMENTATIONS = ("xla", "pallas")


def delta_rule_step(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array, state: jax.Array, *,
                    scale: Optional[float] = None, qk_l2norm: bool = False,
                    implementation: Optional[str] = None) -> tuple[jax.Array, jax.Array]:
    """One decoding step: q, k `[B, H, K]`, v `[B, H, V]`, beta `[B, H]`, state `[B, H, K, V]`.

    Returns `(o [B, H, V] in v's dtype, new_state [B, H, K, V] float32)`.
    implementation: "pallas" (the Pallas step kernel; interpreted off GPU), "xla" (a few fused
    matrix-vector products) or None: pallas on GPU for float32 state math, where it measured
    faster (13.0 vs 13.7 us per token at batch 1, 31 vs 86 us at batch 32, 16 heads of 128 x 128,
    H100; BENCHMARKS.md), xla elsewhere.
    """
    check_step_args(q, k, v, beta, state)
    if implementation is None:
        on_gpu = jax.default_backend() == "gpu"
        implementation = "pallas" if on_gpu and _compute_dtype(q, k, v, beta, state) == jnp.float32 else "xla"
    impl = implementation
    if impl not in STEP_IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}; expected one of {STEP_IMPLEMENTATIONS} or None")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out_dtype = v.dtype
    dtype = _compute_dtype(q, k, v, beta, state)
    if impl == "pallas":
        if dtype != jnp.float32:
            raise ValueError("the Pallas step kernel computes in float32; got float64 inputs (use 'xla')")
        return _pallas_step(q, k, v, beta, state, scale, qk_l2norm, out_dtype)
    q, k, v, beta, state = (x.astype(dtype) for x in (q, k, v, beta, state))
    if qk_l2norm:
        q, k = reference.l2norm(q), reference.l2norm(k)
    o, state = reference.step(q, k, v, beta, state, scale)
    return o.astype(out_dtype), state


def _pallas_step(q, k, v, beta, state, scale, qk_l2norm, out_dtype):
    from pallas_kernels.delta_rule.recurrent import recurrent_step

    K, V = q.shape[-1], v.shape[-1]
    Kp, Vp = max(16, 1 << (K - 1).bit_length()), max(16, 1 << (V - 1).bit_length())
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    if qk_l2norm:
        q, k = reference.l2norm(q), reference.l2norm(k)
    pad = lambda x, axis, n: x if x.shape[axis] == n else jnp.pad(
        x, [(0, n - x.shape[axis]) if i == axis else (0, 0) for i in range(x.ndim)])
    q, k, v = pad(q, 2, Kp), pad(k, 2, Kp), pad(v, 2, Vp)
    state = pad(pad(state.astype(jnp.float32), 2, Kp), 3, Vp)
    o, state = recurrent_step(q, k, v, beta, state, scale=scale, out_dtype=out_dtype,
                              interpret=jax.default_backend() != "gpu")
    return o[..., :V], state[:, :, :K, :V]
