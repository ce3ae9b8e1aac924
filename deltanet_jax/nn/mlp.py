"""SwiGLU feed-forward block (fla's `GatedMLP`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from deltanet_jax.nn.axes import linear_axes


def mlp_intermediate_size(hidden_size: int, hidden_ratio: int | float | None = 4,
                          intermediate_size: int | None = None) -> int:
    """fla's rule: `intermediate_size` if given, else int(hidden * ratio * 2/3) rounded up to 256."""
    if intermediate_size is not None:
        return int(intermediate_size)
    ratio = 4 if hidden_ratio is None else hidden_ratio
    size = int(hidden_size * ratio * 2 / 3)
    return 256 * ((size + 255) // 256)


class GatedMLP(nnx.Module):
    """`down_proj(silu(gate_proj(x)) * up_proj(x))`, all bias-free. x [..., D] -> [..., D]."""

    def __init__(self, hidden_size: int, *, hidden_ratio: int | float | None = 4,
                 intermediate_size: int | None = None, dtype: jnp.dtype | None = None,
                 param_dtype: jnp.dtype = jnp.float32,
                 kernel_init: nnx.Initializer = nnx.initializers.normal(0.02), rngs: nnx.Rngs):
        self.hidden_size = hidden_size
        self.intermediate_size = mlp_intermediate_size(hidden_size, hidden_ratio, intermediate_size)
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        self.gate_proj = nnx.Linear(hidden_size, self.intermediate_size, **kw, **linear_axes("embed", "mlp"))
        self.up_proj = nnx.Linear(hidden_size, self.intermediate_size, **kw, **linear_axes("embed", "mlp"))
        self.down_proj = nnx.Linear(self.intermediate_size, hidden_size, **kw, **linear_axes("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
