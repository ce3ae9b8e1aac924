"""Argument checks for the delta-rule ops: every message names the argument and the shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp

FLOAT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32),
                jnp.dtype(jnp.float64))
IMPLEMENTATIONS = ("recurrent", "chunked", "pallas")


def _check_dtype(name: str, x: jax.Array) -> None:
    if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {x.dtype}; expected one of bfloat16, float16, float32"
                         f" (float64 for the reference implementations)")


def _check_rank(name: str, x, rank: int, layout: str) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"{name} must be an array {layout}, got {type(x).__name__}")
    if x.ndim != rank:
        raise ValueError(f"{name} must have rank {rank} {layout}, got shape {tuple(x.shape)}")


def check_sequence_args(q, k, v, beta, initial_state, segment_ids) -> tuple[int, int, int, int, int]:
    """Validate `delta_rule` arguments; returns (B, T, H, K, V)."""
    _check_rank("q", q, 4, "[B, T, H, K]")
    _check_rank("k", k, 4, "[B, T, H, K]")
    _check_rank("v", v, 4, "[B, T, H, V]")
    _check_rank("beta", beta, 3, "[B, T, H]")
    for name, x in (("q", q), ("k", k), ("v", v), ("beta", beta)):
        _check_dtype(name, x)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if k.shape != q.shape:
        raise ValueError(f"k has shape {tuple(k.shape)} but q has shape {tuple(q.shape)}; they must match")
    if v.shape[:3] != (B, T, H):
        raise ValueError(f"v has shape {tuple(v.shape)}; expected [B, T, H, V] = [{B}, {T}, {H}, V]"
                         f" to match q {tuple(q.shape)}")
    if beta.shape != (B, T, H):
        raise ValueError(f"beta has shape {tuple(beta.shape)}; expected [B, T, H] = {(B, T, H)}")
    if T == 0 or K == 0 or V == 0:
        raise ValueError(f"empty input: q {tuple(q.shape)}, v {tuple(v.shape)}")
    if initial_state is not None:
        _check_rank("initial_state", initial_state, 4, "[B, H, K, V]")
        _check_dtype("initial_state", initial_state)
        if initial_state.shape != (B, H, K, V):
            raise ValueError(f"initial_state has shape {tuple(initial_state.shape)}; expected"
                             f" [B, H, K, V] = {(B, H, K, V)}")
    if segment_ids is not None:
        _check_rank("segment_ids", segment_ids, 2, "[B, T]")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids has dtype {segment_ids.dtype}; expected an integer dtype")
        if segment_ids.shape != (B, T):
            raise ValueError(f"segment_ids has shape {tuple(segment_ids.shape)}; expected [B, T] = {(B, T)}")
    return B, T, H, K, V


def check_step_args(q, k, v, beta, state) -> None:
    """Validate `delta_rule_step` arguments (shapes without T)."""
    _check_rank("q", q, 3, "[B, H, K]")
    _check_rank("k", k, 3, "[B, H, K]")
    _check_rank("v", v, 3, "[B, H, V]")
    _check_rank("beta", beta, 2, "[B, H]")
    _check_rank("state", state, 4, "[B, H, K, V]")
    for name, x in (("q", q), ("k", k), ("v", v), ("beta", beta), ("state", state)):
        _check_dtype(name, x)
    B, H, K = q.shape
    V = v.shape[-1]
    if k.shape != q.shape:
        raise ValueError(f"k has shape {tuple(k.shape)} but q has shape {tuple(q.shape)}; they must match")
    if v.shape[:2] != (B, H):
        raise ValueError(f"v has shape {tuple(v.shape)}; expected [B, H, V] with [B, H] = {(B, H)}")
    if beta.shape != (B, H):
        raise ValueError(f"beta has shape {tuple(beta.shape)}; expected [B, H] = {(B, H)}")
    if state.shape != (B, H, K, V):
        raise ValueError(f"state has shape {tuple(state.shape)}; expected [B, H, K, V] = {(B, H, K, V)}")
