"""Causal softmax attention (fla's `Attention` layer): RoPE, grouped KV heads, sliding window, KV cache.

x [B, T, hidden] -> q [B, T, H, D], k, v [B, T, Hkv, D] (D = hidden / H) through `q_proj`, `k_proj`,
`v_proj` (bias with `qkv_bias`), rotary embeddings (half-split, base `rope_theta`) at each token's
position within its segment, `jax.nn.dot_product_attention`, and a bias-free `o_proj`.

Masking: a token attends to earlier-or-same tokens of its own segment (`segment_ids`, 0 = padding,
same convention as the delta rule) and, with `window_size` W, only to the last W of them (itself
included; fla's flash-attn window `(W - 1, 0)`). Padding tokens output 0.

Decoding: `prefill` returns an `AttentionCache` of `capacity` slots; a token at position p of its
segment lives in slot `p % capacity`, so for sliding attention (capacity W) the cache is a ring
buffer that always holds the last W tokens. Global attention takes `max_length` slots; a sequence
longer than that keeps only its last `max_length` tokens in view.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from deltanet_jax.nn.axes import linear_axes
from deltanet_jax.ops.segments import segment_index, segment_starts


class AttentionCache(NamedTuple):
    """KV cache of one attention layer (a pytree).

    k, v [B, C, Hkv, D] (keys after RoPE); slot_pos [B, C] int32, the segment position of the token
    in each slot (-1 = empty); next_pos [B] int32, the position of the next token.
    """

    k: jax.Array
    v: jax.Array
    slot_pos: jax.Array
    next_pos: jax.Array


def segment_positions(segment_ids: jax.Array | None, batch: int, length: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """-> (pos [B, T] int32 position within the segment, seg_index [B, T], valid [B, T] bool).

    Padding does not advance the position; padding before a segment's first token gets position 0.
    """
    if segment_ids is None:
        pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        return pos, jnp.zeros((batch, length), jnp.int32), jnp.ones((batch, length), bool)
    seg, valid = segment_index(segment_ids)
    count = jnp.cumsum(valid.astype(jnp.int32), axis=1)  # valid tokens up to and including t
    starts = segment_starts(seg)
    base = jax.lax.cummax(jnp.where(starts, count - 1, 0), axis=1)
    return jnp.maximum(count - 1 - base, 0), seg, valid


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
    """Inverse frequencies [D / 2] float32: theta ** (-2i / D)."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x: jax.Array, pos: jax.Array, theta: float) -> jax.Array:
    """Rotate halves of x [..., H, D] by angle pos [...] * inv_freq (computed in float32)."""
    d = x.shape[-1]
    ang = pos.astype(jnp.float32)[..., None, None] * rope_frequencies(d, theta)  # [..., 1, D/2]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


def _implementation(dtype: jnp.dtype, head_dim: int, masked: bool) -> str | None:
    """cuDNN on GPU for half-precision causal / sliding masks without segments; XLA otherwise."""
    if (jax.default_backend() == "gpu" and not masked and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
            and head_dim % 8 == 0 and head_dim <= 128):
        return "cudnn"
    return None


class Attention(nnx.Module):
    """Multi-head causal attention: x [B, T, hidden_size] -> [B, T, hidden_size]."""

    def __init__(self, hidden_size: int, num_heads: int, *, num_kv_heads: int | None = None,
                 qkv_bias: bool = False, window_size: int | None = None, rope_theta: float = 10000.0,
                 max_position_embeddings: int = 2048, dtype: jnp.dtype | None = None,
                 param_dtype: jnp.dtype = jnp.float32,
                 kernel_init: nnx.Initializer = nnx.initializers.normal(0.02), rngs: nnx.Rngs):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} must be a positive multiple of num_kv_heads {num_kv_heads}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        if window_size is not None and window_size <= 0:
            raise ValueError(f"window_size must be positive or None, got {window_size}")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.kv_dim = num_kv_heads * self.head_dim
        self.window_size = window_size
        self.rope_theta = float(rope_theta)
        self.max_position_embeddings = max_position_embeddings
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        self.q_proj = nnx.Linear(hidden_size, hidden_size, use_bias=qkv_bias, **kw, **linear_axes("embed", "heads"))
        self.k_proj = nnx.Linear(hidden_size, self.kv_dim, use_bias=qkv_bias, **kw, **linear_axes("embed", "kv_heads"))
        self.v_proj = nnx.Linear(hidden_size, self.kv_dim, use_bias=qkv_bias, **kw, **linear_axes("embed", "kv_heads"))
        self.o_proj = nnx.Linear(hidden_size, hidden_size, use_bias=False, **kw, **linear_axes("heads", "embed"))

    # ---- pieces --------------------------------------------------------------------------------

    def _check_input(self, x: jax.Array, ndim: int) -> None:
        if x.ndim != ndim or x.shape[-1] != self.hidden_size:
            want = "[B, T, hidden]" if ndim == 3 else "[B, hidden]"
            raise ValueError(f"Attention input must be {want} with hidden={self.hidden_size}, got {x.shape}")

    def _qkv(self, x: jax.Array, pos: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [..., hidden], pos [...] -> q [..., H, D], k, v [..., Hkv, D] (q, k rotated)."""
        lead = x.shape[:-1]
        q = self.q_proj(x).reshape(lead + (self.num_heads, self.head_dim))
        k = self.k_proj(x).reshape(lead + (self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).reshape(lead + (self.num_kv_heads, self.head_dim))
        return apply_rope(q, pos, self.rope_theta), apply_rope(k, pos, self.rope_theta), v

    def _sequence(self, x: jax.Array, segment_ids: jax.Array | None):
        self._check_input(x, 3)
        b, t = x.shape[:2]
        if segment_ids is not None and segment_ids.shape != (b, t):
            raise ValueError(f"segment_ids must be [B, T] = {(b, t)}, got {segment_ids.shape}")
        if self.dtype is not None:
            x = x.astype(self.dtype)
        pos, seg, valid = segment_positions(segment_ids, b, t)
        q, k, v = self._qkv(x, pos)
        window = None if self.window_size is None else (self.window_size - 1, 0)
        if segment_ids is None:
            o = jax.nn.dot_product_attention(
                q, k, v, is_causal=True, local_window_size=window,
                implementation=_implementation(q.dtype, self.head_dim, masked=False))
        else:
            idx = jnp.arange(t)
            mask = (idx[None, :, None] >= idx[None, None, :]) & (seg[:, :, None] == seg[:, None, :])
            mask &= valid[:, None, :]
            if self.window_size is not None:
                mask &= pos[:, :, None] - pos[:, None, :] < self.window_size
            mask |= jnp.eye(t, dtype=bool)[None]  # padding queries see themselves (output zeroed below)
            o = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None],
                                             implementation=_implementation(q.dtype, self.head_dim, masked=True))
            o = o * valid[:, :, None, None].astype(o.dtype)
        y = self.o_proj(o.reshape(b, t, self.hidden_size))
        return y, (k, v, pos, seg, valid)

    # ---- public API ------------------------------------------------------------------------------

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
        """x [B, T, hidden], segment_ids [B, T] (0 = padding) -> [B, T, hidden]."""
        return self._sequence(x, segment_ids)[0]

    def cache_capacity(self, max_length: int | None) -> int:
        """Slots of the KV cache: the window for sliding attention, else `max_length`."""
        if self.window_size is not None:
            return self.window_size
        cap = self.max_position_embeddings if max_length is None else max_length
        if cap <= 0:
            raise ValueError(f"max_length must be positive, got {cap}")
        return cap

    def init_cache(self, batch_size: int, max_length: int | None = None) -> AttentionCache:
        """Empty KV cache for `batch_size` rows (capacity: see `cache_capacity`)."""
        c = self.cache_capacity(max_length)
        dtype = self.dtype or self.q_proj.kernel[...].dtype
        kv = jnp.zeros((batch_size, c, self.num_kv_heads, self.head_dim), dtype)
        return AttentionCache(kv, kv, jnp.full((batch_size, c), -1, jnp.int32), jnp.zeros((batch_size,), jnp.int32))

    def prefill(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
                max_length: int | None = None) -> tuple[jax.Array, AttentionCache]:
        """Run a prompt: (y [B, T, hidden], cache of each row's last segment).

        Prompts of different lengths are left-padded with segment id 0. Global attention needs
        `max_length` >= T (default `max_position_embeddings`).
        """
        self._check_input(x, 3)
        b, t = x.shape[:2]
        c = self.cache_capacity(max_length)
        if self.window_size is None and t > c:
            raise ValueError(f"prompt length {t} exceeds the KV cache max_length {c}")
        y, (k, v, pos, seg, valid) = self._sequence(x, segment_ids)
        last_seg = jnp.max(jnp.where(valid, seg, -1), axis=1, keepdims=True)
        keep = valid & (seg == last_seg)
        n = jnp.max(jnp.where(keep, pos + 1, 0), axis=1)  # tokens in the last segment
        keep &= pos >= (n[:, None] - c)
        slot = jnp.where(keep, pos % c, c)  # c: out of range, dropped
        rows = jnp.arange(b)[:, None]
        cache = self.init_cache(b, c if self.window_size is None else None)
        ck = cache.k.at[rows, slot].set(k.astype(cache.k.dtype), mode="drop")
        cv = cache.v.at[rows, slot].set(v.astype(cache.v.dtype), mode="drop")
        cpos = cache.slot_pos.at[rows, slot].set(pos, mode="drop")
        return y, AttentionCache(ck, cv, cpos, n.astype(jnp.int32))

    def step(self, x_t: jax.Array, cache: AttentionCache) -> tuple[jax.Array, AttentionCache]:
        """One token: x_t [B, hidden] -> (y_t [B, hidden], cache with the token appended)."""
        self._check_input(x_t, 2)
        b = x_t.shape[0]
        want = (b, cache.k.shape[1], self.num_kv_heads, self.head_dim)
        if cache.k.shape != want or cache.v.shape != want or cache.slot_pos.shape != want[:2]:
            raise ValueError(f"cache k, v must be {want} and slot_pos {want[:2]}, got {cache.k.shape}, "
                             f"{cache.v.shape}, {cache.slot_pos.shape}")
        if self.dtype is not None:
            x_t = x_t.astype(self.dtype)
        c = cache.k.shape[1]
        p = cache.next_pos
        q, k, v = self._qkv(x_t, p)
        rows = jnp.arange(b)
        slot = p % c
        ck = cache.k.at[rows, slot].set(k.astype(cache.k.dtype))
        cv = cache.v.at[rows, slot].set(v.astype(cache.v.dtype))
        cpos = cache.slot_pos.at[rows, slot].set(p)
        mask = cpos >= 0
        if self.window_size is not None:
            mask &= p[:, None] - cpos < self.window_size
        o = jax.nn.dot_product_attention(q[:, None], ck.astype(q.dtype), cv.astype(q.dtype),
                                         mask=mask[:, None, None, :])
        y = self.o_proj(o.reshape(b, self.hidden_size))
        return y, AttentionCache(ck, cv, cpos, p + 1)
