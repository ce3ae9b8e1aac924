"""Packed-sequence bookkeeping shared by every delta-rule implementation.

`segment_ids [B, T]` (int, 0 = padding) becomes two arrays the scans use:

- `valid [B, T]` bool: the token belongs to a segment (padding is skipped: it neither reads nor
  changes the state, and its output is 0);
- `seg_index [B, T]` int32, non-decreasing along T: 0 for the first segment of a row (which starts
  from `initial_state`) and +1 at every later segment start, so tokens i and j interact iff their
  `seg_index` match. A segment starts where a valid token's id differs from the id of the previous
  valid token; padding between two tokens of the same id does not split them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_index(segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`segment_ids [B, T]` -> `(seg_index [B, T] int32, valid [B, T] bool)`."""
    seg = segment_ids.astype(jnp.int32)
    valid = seg != 0
    t = jnp.arange(seg.shape[1], dtype=jnp.int32)
    last_valid = jax.lax.cummax(jnp.where(valid, t[None, :], -1), axis=1)
    prev_valid = jnp.concatenate([jnp.full_like(last_valid[:, :1], -1), last_valid[:, :-1]], axis=1)
    prev_id = jnp.take_along_axis(seg, jnp.maximum(prev_valid, 0), axis=1)
    starts = valid & (prev_valid >= 0) & (prev_id != seg)
    return jnp.cumsum(starts.astype(jnp.int32), axis=1), valid


def segment_starts(seg_index: jax.Array) -> jax.Array:
    """`seg_index [B, T]` -> bool `[B, T]`, True where the state restarts from zero."""
    prev = jnp.concatenate([seg_index[:, :1], seg_index[:, :-1]], axis=1)
    return seg_index != prev
