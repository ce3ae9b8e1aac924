"""The DeltaNet token mixer (fla's `DeltaNet` layer) with prefill and one-token decoding.

x [B, T, hidden] -> q, k [B, T, H, K], v [B, T, H, V] through bias-free projections, a causal
short convolution each (SiLU for v always, for q and k when `qk_activation == "silu"`), the q/k
feature map and normalisation, `beta = sigmoid(b_proj(x))` (x2 with `allow_neg_eigval`), the delta
rule, a per-head (gated) RMSNorm and `o_proj`. Attribute names follow fla so weights map 1:1.

With a `mesh` (axes "data", "fsdp", "tensor"), the delta rule and the Pallas short convolutions run
inside `jax.shard_map`, the batch split over data x fsdp and the heads over tensor (when they
divide); without one they are plain calls, as on one device.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from deltanet_jax.nn.axes import BATCH_MESH_AXES, HEAD_MESH_AXES, linear_axes
from deltanet_jax.nn.norm import GatedRMSNorm, RMSNorm
from deltanet_jax.nn.short_conv import ShortConvolution
from deltanet_jax.ops import delta_rule, delta_rule_sharded, delta_rule_step

QK_ACTIVATIONS = ("silu", "relu", "elu", "identity")
QK_NORMS = ("l2", "sum")


class DeltaNetCache(NamedTuple):
    """Decoding state of one DeltaNet layer (a pytree).

    recurrent_state [B, H, K, V] float32; conv_state (q, k, v) with shapes [B, W - 1, key_dim],
    [B, W - 1, key_dim], [B, W - 1, value_dim], or None without short convolutions.
    """

    recurrent_state: jax.Array
    conv_state: tuple[jax.Array, jax.Array, jax.Array] | None


def _feature_map(x: jax.Array, activation: str) -> jax.Array:
    if activation == "relu":
        return jax.nn.relu(x)
    if activation == "elu":
        return (jax.nn.elu(x.astype(jnp.float32)) + 1.0).astype(x.dtype)
    return x  # "silu" is applied with the convolution (or right after the projection); "identity"


def _sum_normalize(x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    return (x32 / jnp.sum(x32, axis=-1, keepdims=True)).astype(x.dtype)


class DeltaNet(nnx.Module):
    """DeltaNet layer: x [B, T, hidden_size] -> [B, T, hidden_size]."""

    def __init__(self, hidden_size: int, num_heads: int, *, expand_k: float = 1.0, expand_v: float = 1.0,
                 use_beta: bool = True, use_gate: bool = False, use_short_conv: bool = True,
                 conv_size: int = 4, allow_neg_eigval: bool = False, qk_activation: str = "silu",
                 qk_norm: str = "l2", norm_eps: float = 1e-5, implementation: str | None = None,
                 dtype: jnp.dtype | None = None, param_dtype: jnp.dtype = jnp.float32,
                 kernel_init: nnx.Initializer = nnx.initializers.normal(0.02), mesh: Mesh | None = None,
                 rngs: nnx.Rngs):
        if qk_activation not in QK_ACTIVATIONS:
            raise ValueError(f"qk_activation must be one of {QK_ACTIVATIONS}, got {qk_activation!r}")
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {qk_norm!r}")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.key_dim = int(hidden_size * expand_k)
        self.value_dim = int(hidden_size * expand_v)
        if self.key_dim % num_heads or self.value_dim % num_heads:
            raise ValueError(f"key_dim {self.key_dim} and value_dim {self.value_dim} must be divisible by "
                             f"num_heads {num_heads}")
        self.head_k_dim = self.key_dim // num_heads
        self.head_v_dim = self.value_dim // num_heads
        self.use_beta = use_beta
        self.use_gate = use_gate
        self.use_short_conv = use_short_conv
        self.conv_size = conv_size
        self.allow_neg_eigval = allow_neg_eigval
        self.qk_activation = qk_activation
        self.qk_norm = qk_norm
        self.implementation = implementation
        self.dtype = dtype
        self.mesh = mesh

        lin = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        into_heads = linear_axes("embed", "heads")
        self.q_proj = nnx.Linear(hidden_size, self.key_dim, **lin, **into_heads)
        self.k_proj = nnx.Linear(hidden_size, self.key_dim, **lin, **into_heads)
        self.v_proj = nnx.Linear(hidden_size, self.value_dim, **lin, **into_heads)
        if use_beta:
            self.b_proj = nnx.Linear(hidden_size, num_heads, **lin, **into_heads)
        if use_short_conv:
            conv = dict(kernel_size=conv_size, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init,
                        mesh=mesh, rngs=rngs)
            qk_conv_act = "silu" if qk_activation == "silu" else None
            self.q_conv1d = ShortConvolution(self.key_dim, activation=qk_conv_act, **conv)
            self.k_conv1d = ShortConvolution(self.key_dim, activation=qk_conv_act, **conv)
            self.v_conv1d = ShortConvolution(self.value_dim, activation="silu", **conv)
        if use_gate:
            self.g_proj = nnx.Linear(hidden_size, self.value_dim, **lin, **into_heads)
            self.o_norm = GatedRMSNorm(self.head_v_dim, eps=norm_eps, dtype=dtype, param_dtype=param_dtype)
        else:
            self.o_norm = RMSNorm(self.head_v_dim, eps=norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.o_proj = nnx.Linear(self.value_dim, hidden_size, **lin, **linear_axes("heads", "embed"))

    # ---- shared pieces -------------------------------------------------------------------------

    def _check_input(self, x: jax.Array, ndim: int) -> None:
        if x.ndim != ndim or x.shape[-1] != self.hidden_size:
            want = "[B, T, hidden]" if ndim == 3 else "[B, hidden]"
            raise ValueError(f"DeltaNet input must be {want} with hidden={self.hidden_size}, got {x.shape}")

    def _qk_features(self, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        """q, k [..., H, K] after the convolution: feature map, then 'sum' normalisation."""
        q, k = _feature_map(q, self.qk_activation), _feature_map(k, self.qk_activation)
        if self.qk_norm == "sum":
            q, k = _sum_normalize(q), _sum_normalize(k)
        return q, k

    def _beta(self, x: jax.Array, out_dtype) -> jax.Array:
        """x [..., hidden] -> beta [..., H]."""
        if self.use_beta:
            beta = jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))
        else:
            beta = jnp.ones(x.shape[:-1] + (self.num_heads,), jnp.float32)
        if self.allow_neg_eigval:
            beta = beta * 2.0
        return beta.astype(out_dtype)

    def _output(self, o: jax.Array, x: jax.Array) -> jax.Array:
        """o [..., H, V] from the delta rule, x [..., hidden] the layer input -> [..., hidden]."""
        if self.use_gate:
            g = self.g_proj(x).reshape(o.shape)
            o = self.o_norm(o, g)
        else:
            o = self.o_norm(o)
        return self.o_proj(o.reshape(o.shape[:-2] + (self.value_dim,)))

    def _project(self, x: jax.Array, segment_ids: jax.Array | None):
        """x [B, T, hidden] -> q, k [B, T, H, K], v [B, T, H, V], conv final states (or None)."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        conv_state = None
        if self.use_short_conv:
            q, cq = self.q_conv1d(q, segment_ids=segment_ids)
            k, ck = self.k_conv1d(k, segment_ids=segment_ids)
            v, cv = self.v_conv1d(v, segment_ids=segment_ids)
            conv_state = (cq, ck, cv)
        else:
            if self.qk_activation == "silu":
                q, k = jax.nn.silu(q), jax.nn.silu(k)
            v = jax.nn.silu(v)
        b, t = x.shape[:2]
        q = q.reshape(b, t, self.num_heads, self.head_k_dim)
        k = k.reshape(b, t, self.num_heads, self.head_k_dim)
        v = v.reshape(b, t, self.num_heads, self.head_v_dim)
        q, k = self._qk_features(q, k)
        return q, k, v, conv_state

    def _sequence(self, x: jax.Array, segment_ids: jax.Array | None, output_final_state: bool):
        self._check_input(x, 3)
        if segment_ids is not None and segment_ids.shape != x.shape[:2]:
            raise ValueError(f"segment_ids must be [B, T] = {x.shape[:2]}, got {segment_ids.shape}")
        if self.dtype is not None:
            x = x.astype(self.dtype)
        q, k, v, conv_state = self._project(x, segment_ids)
        beta = self._beta(x, v.dtype)
        o, state = self._mix(q, k, v, beta, segment_ids, output_final_state)
        return self._output(o, x), state, conv_state

    def _mix(self, q, k, v, beta, segment_ids, output_final_state):
        """The sequence op: q, k [B, T, H, K], v [B, T, H, V], beta [B, T, H] -> (o, final state)."""
        kw = dict(output_final_state=output_final_state, segment_ids=segment_ids, qk_l2norm=self.qk_norm == "l2",
                  implementation=self.implementation)
        if self.mesh is None:
            return delta_rule(q, k, v, beta, **kw)
        heads = tuple(a for a in HEAD_MESH_AXES if self.num_heads % self.mesh.shape[a] == 0)
        return delta_rule_sharded(q, k, v, beta, mesh=self.mesh, batch_axes=BATCH_MESH_AXES, head_axes=heads, **kw)

    def _mix_step(self, q, k, v, beta, state):
        """The one-token op: q, k [B, H, K], v [B, H, V], beta [B, H] -> (o, new state)."""
        return delta_rule_step(q, k, v, beta, state, qk_l2norm=self.qk_norm == "l2")

    # ---- public API ------------------------------------------------------------------------------

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
        """x [B, T, hidden], segment_ids [B, T] (0 = padding) -> [B, T, hidden]."""
        return self._sequence(x, segment_ids, output_final_state=False)[0]

    def init_cache(self, batch_size: int) -> DeltaNetCache:
        """Empty decoding cache for `batch_size` rows."""
        state = jnp.zeros((batch_size, self.num_heads, self.head_k_dim, self.head_v_dim), jnp.float32)
        conv_state = None
        if self.use_short_conv:
            conv_state = (self.q_conv1d.init_state(batch_size), self.k_conv1d.init_state(batch_size),
                          self.v_conv1d.init_state(batch_size))
        return DeltaNetCache(state, conv_state)

    def prefill(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> tuple[jax.Array, DeltaNetCache]:
        """Run a prompt and return (y [B, T, hidden], cache after its last token).

        With segment_ids the cache belongs to each row's last segment, so prompts of different
        lengths are left-padded with segment id 0.
        """
        y, state, conv_state = self._sequence(x, segment_ids, output_final_state=True)
        return y, DeltaNetCache(state, conv_state)

    def step(self, x_t: jax.Array, cache: DeltaNetCache) -> tuple[jax.Array, DeltaNetCache]:
        """One token: x_t [B, hidden] -> (y_t [B, hidden], new cache)."""
        self._check_input(x_t, 2)
        b = x_t.shape[0]
        want = (b, self.num_heads, self.head_k_dim, self.head_v_dim)
        if cache.recurrent_state.shape != want:
            raise ValueError(f"cache.recurrent_state must be {want}, got {cache.recurrent_state.shape}")
        if self.use_short_conv and cache.conv_state is None:
            raise ValueError("cache.conv_state is missing but the layer uses short convolutions")
        if self.dtype is not None:
            x_t = x_t.astype(self.dtype)
        q, k, v = self.q_proj(x_t), self.k_proj(x_t), self.v_proj(x_t)
        conv_state = None
        if self.use_short_conv:
            cq, ck, cv = cache.conv_state
            q, cq = self.q_conv1d.step(q, cq)
            k, ck = self.k_conv1d.step(k, ck)
            v, cv = self.v_conv1d.step(v, cv)
            conv_state = (cq, ck, cv)
        else:
            if self.qk_activation == "silu":
                q, k = jax.nn.silu(q), jax.nn.silu(k)
            v = jax.nn.silu(v)
        q = q.reshape(b, self.num_heads, self.head_k_dim)
        k = k.reshape(b, self.num_heads, self.head_k_dim)
        v = v.reshape(b, self.num_heads, self.head_v_dim)
        q, k = self._qk_features(q, k)
        beta = self._beta(x_t, v.dtype)
        o, state = self._mix_step(q, k, v, beta, cache.recurrent_state)
        return self._output(o, x_t), DeltaNetCache(state, conv_state)
