"""Vanilla (additive) linear attention: `S_t = S_{t-1} + k_t v_t^T`, `o_t = S_t^T (scale * q_t)`.

Same layout and segment convention as the delta rule: q, k [B, T, H, K], v [B, T, H, V], state
[B, H, K, V] float32, segment_ids [B, T] int (0 = padding: skipped, output 0; the state restarts
from zero at every later segment, the row's first segment starts from `initial_state`).

The sequence form is chunked: within a chunk of C tokens `O = scale * (Q S + (tril(Q K^T) * M) V)`
with M the same-segment mask, then `S <- S' + K^T V` over the chunk's last segment, where S' is S
when the chunk does not start a new segment and 0 otherwise. Accumulation is in float32.
Sequences of at most `ONE_BLOCK_MAX_LEN` tokens are one chunk by default: the quadratic form alone,
without the scan over chunks (T^2 work, which at these lengths costs less than the scan's steps).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deltanet_jax.ops.segments import segment_index

CHUNK_SIZE = 64
ONE_BLOCK_MAX_LEN = 512  # chunk_size=None: sequences up to this long are computed as one chunk


def _check(q: jax.Array, k: jax.Array, v: jax.Array, seq: bool) -> None:
    nd = 4 if seq else 3
    if q.ndim != nd or k.shape != q.shape or v.ndim != nd or v.shape[:-1] != q.shape[:-1]:
        want = "q, k [B, T, H, K] and v [B, T, H, V]" if seq else "q, k [B, H, K] and v [B, H, V]"
        raise ValueError(f"linear attention expects {want}, got q {q.shape}, k {k.shape}, v {v.shape}")


def default_chunk_size(t: int) -> int:
    """The chunk length `chunk_size=None` picks for T tokens: T itself up to `ONE_BLOCK_MAX_LEN`, else
    `CHUNK_SIZE`."""
    return t if t <= ONE_BLOCK_MAX_LEN else CHUNK_SIZE


def linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None,
                     initial_state: jax.Array | None = None, output_final_state: bool = False,
                     segment_ids: jax.Array | None = None, chunk_size: int | None = None
                     ) -> tuple[jax.Array, jax.Array | None]:
    """Causal linear attention over a sequence -> (o [B, T, H, V] in v's dtype, final state or None).

    The final state is the state after the last valid token (that of the row's last segment).
    `chunk_size` None: the whole sequence as one chunk up to `ONE_BLOCK_MAX_LEN` tokens, else
    `CHUNK_SIZE`.
    """
    _check(q, k, v, seq=True)
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    scale = dk ** -0.5 if scale is None else scale
    if initial_state is not None and initial_state.shape != (b, h, dk, dv):
        raise ValueError(f"initial_state must be {(b, h, dk, dv)}, got {initial_state.shape}")
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids must be [B, T] = {(b, t)}, got {segment_ids.shape}")
    if t < 1:
        raise ValueError(f"linear attention needs at least one token, got T = {t}")
    if chunk_size is None:
        chunk_size = default_chunk_size(t)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    if segment_ids is None:
        seg = jnp.zeros((b, t), jnp.int32)
        valid = jnp.ones((b, t), bool)
    else:
        seg, valid = segment_index(segment_ids)

    c = min(chunk_size, t)
    pad = (-t) % c
    n = (t + pad) // c

    def chunks(x, fill=0):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return jnp.moveaxis(x.reshape((b, n, c) + x.shape[2:]), 1, 0)  # [n, B, C, ...]

    f32 = jnp.float32
    qc = chunks(q.astype(f32) * scale)
    kc = chunks(k.astype(f32))
    vc = chunks(v.astype(f32))
    segc = chunks(seg, fill=-1)
    validc = chunks(valid, fill=False)
    causal = jnp.tril(jnp.ones((c, c), bool))
    state0 = jnp.zeros((b, h, dk, dv), f32) if initial_state is None else initial_state.astype(f32)

    def body(carry, xs, state_is_zero=False):
        state, cur = carry  # state [B, H, K, V] of segment index `cur` [B]
        qi, ki, vi, si, mi = xs
        same = (si[:, :, None] == si[:, None, :]) & mi[:, None, :] & causal  # [B, C, C]
        scores = jnp.einsum("bihk,bjhk->bhij", qi, ki) * same[:, None]
        o = jnp.einsum("bhij,bjhv->bihv", scores, vi)
        if not state_is_zero:
            carried = (si == cur[:, None])[:, :, None, None]
            o = o + jnp.einsum("bihk,bhkv->bihv", qi, state) * carried
        o = o * mi[:, :, None, None]
        last = jnp.max(jnp.where(mi, si, -1), axis=1)  # segment of the chunk's last valid token
        new_cur = jnp.where(last >= 0, last, cur)
        keep = (new_cur == cur)[:, None, None, None]
        take = (mi & (si == new_cur[:, None]))[:, :, None, None]
        new_state = state * keep + jnp.einsum("bjhk,bjhv->bhkv", ki * take, vi)
        return (new_state, new_cur), o

    carry0 = (state0, jnp.zeros((b,), jnp.int32))
    if n == 1:  # one chunk: no scan
        (state, _), o = body(carry0, (qc[0], kc[0], vc[0], segc[0], validc[0]),
                             state_is_zero=initial_state is None)
        o = o[None]
    else:
        (state, _), o = jax.lax.scan(body, carry0, (qc, kc, vc, segc, validc))
    o = jnp.moveaxis(o, 0, 1).reshape(b, n * c, h, dv)[:, :t].astype(v.dtype)
    return o, (state if output_final_state else None)


def linear_attention_step(q: jax.Array, k: jax.Array, v: jax.Array, state: jax.Array, *,
                          scale: float | None = None) -> tuple[jax.Array, jax.Array]:
    """One token: q, k [B, H, K], v [B, H, V], state [B, H, K, V] -> (o [B, H, V], new state)."""
    _check(q, k, v, seq=False)
    b, h, dk = q.shape
    if state.shape != (b, h, dk, v.shape[-1]):
        raise ValueError(f"state must be {(b, h, dk, v.shape[-1])}, got {state.shape}")
    scale = dk ** -0.5 if scale is None else scale
    f32 = jnp.float32
    state = state.astype(f32) + jnp.einsum("bhk,bhv->bhkv", k.astype(f32), v.astype(f32))
    o = jnp.einsum("bhk,bhkv->bhv", q.astype(f32) * scale, state)
    return o.astype(v.dtype), state
