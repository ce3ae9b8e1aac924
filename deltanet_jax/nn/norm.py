"""RMS normalisation layers (fla's `RMSNorm` and `FusedRMSNormGated` semantics).

Both compute in float32 whatever the input dtype and return the module's compute dtype
(the input's dtype when none is set). The learnable `weight` starts at ones; its logical axis
is "norm" (replicated by the sharding rules).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """`x / sqrt(mean(x**2, -1) + eps) * weight` in float32. x [..., D], weight [D]."""
    x32 = x.astype(jnp.float32)
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return x32 * rstd * weight.astype(jnp.float32)


# Rematerialised (as the gated form below): the backward keeps the input and weight, not the
# float32 copies and products of x, which would be several float32 [..., D] arrays per norm.
@functools.partial(jax.checkpoint, static_argnums=(2, 3))
def _rms_norm_cast(x: jax.Array, weight: jax.Array, eps: float, out_dtype: jnp.dtype) -> jax.Array:
    return rms_norm(x, weight, eps).astype(out_dtype)


@functools.partial(jax.checkpoint, static_argnums=(3, 4))
def _gated_rms_norm_cast(x: jax.Array, gate: jax.Array, weight: jax.Array, eps: float,
                         out_dtype: jnp.dtype) -> jax.Array:
    return (rms_norm(x, weight, eps) * jax.nn.silu(gate.astype(jnp.float32))).astype(out_dtype)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis: x [..., D] -> [..., D]."""

    def __init__(self, num_features: int, *, eps: float = 1e-6, dtype: jnp.dtype | None = None,
                 param_dtype: jnp.dtype = jnp.float32):
        if num_features <= 0:
            raise ValueError(f"RMSNorm num_features must be positive, got {num_features}")
        self.num_features = num_features
        self.eps = float(eps)
        self.dtype = dtype
        self.weight = nnx.Param(jnp.ones((num_features,), param_dtype), logical_axes=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.num_features:
            raise ValueError(f"RMSNorm expects last axis {self.num_features}, got shape {x.shape}")
        return _rms_norm_cast(x, self.weight[...], self.eps, jnp.dtype(self.dtype or x.dtype))


class GatedRMSNorm(nnx.Module):
    """Gated RMSNorm: `rmsnorm(x) * weight * silu(gate)`, x and gate [..., D] -> [..., D]."""

    def __init__(self, num_features: int, *, eps: float = 1e-6, dtype: jnp.dtype | None = None,
                 param_dtype: jnp.dtype = jnp.float32):
        if num_features <= 0:
            raise ValueError(f"GatedRMSNorm num_features must be positive, got {num_features}")
        self.num_features = num_features
        self.eps = float(eps)
        self.dtype = dtype
        self.weight = nnx.Param(jnp.ones((num_features,), param_dtype), logical_axes=("norm",))

    def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:
        if x.shape[-1] != self.num_features or gate.shape != x.shape:
            raise ValueError(f"GatedRMSNorm expects x and gate of one shape [..., {self.num_features}], "
                             f"got {x.shape} and {gate.shape}")
        return _gated_rms_norm_cast(x, gate, self.weight[...], self.eps, jnp.dtype(self.dtype or x.dtype))
