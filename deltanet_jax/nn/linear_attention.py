"""Vanilla linear-attention mixer: the DeltaNet layer with the additive rule `S_t = S_{t-1} + k_t v_t^T`.

Same projections, short convolutions, q/k feature map and normalisation, per-head output norm and
`o_proj` as `DeltaNet` (so the two differ only in the state update), without `b_proj`: there is
no beta. x [B, T, hidden] -> [B, T, hidden]; decoding caches are `DeltaNetCache`s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deltanet_jax.nn.deltanet import DeltaNet
from deltanet_jax.ops.linear_attention import linear_attention, linear_attention_step
from deltanet_jax.ops.reference import l2norm


class LinearAttention(DeltaNet):
    """Linear-attention layer; takes DeltaNet's arguments except `use_beta` and `allow_neg_eigval`."""

    def __init__(self, hidden_size: int, num_heads: int, **kwargs):
        for name in ("use_beta", "allow_neg_eigval"):
            if kwargs.pop(name, False):
                raise ValueError(f"LinearAttention has no beta: {name}=True is not supported")
        kwargs.pop("implementation", None)
        super().__init__(hidden_size, num_heads, use_beta=False, allow_neg_eigval=False, **kwargs)

    def _normalize(self, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.qk_norm == "l2":
            return l2norm(q.astype(jnp.float32)), l2norm(k.astype(jnp.float32))
        return q, k

    def _mix(self, q, k, v, beta, segment_ids, output_final_state):
        q, k = self._normalize(q, k)
        return linear_attention(q, k, v, output_final_state=output_final_state, segment_ids=segment_ids)

    def _mix_step(self, q, k, v, beta, state):
        q, k = self._normalize(q, k)
        return linear_attention_step(q, k, v, state)
