"""Logical axis names of parameters, read by the sharding rules of `deltanet_jax.train.sharding`.

Every `nnx.Param` carries a `logical_axes` metadata tuple, one name (or None) per array axis:
"embed" (model width), "vocab", "heads" (head-major features of the token mixers: q/k/v/gate
projections, short convolutions, beta), "kv_heads" (grouped attention keys/values), "mlp"
(the SwiGLU intermediate), "norm" (normalisation scales). Names describe the model only; which
mesh axes they map to is the trainer's choice, except for the activations that Pallas kernels take
inside `jax.shard_map`: their rows split over `BATCH_MESH_AXES` and their heads (channels) over
`HEAD_MESH_AXES`, the trainer's mesh axes for "batch" and "heads" (deltanet_jax.train.sharding).
"""

from __future__ import annotations

from typing import Any

BATCH_MESH_AXES = ("data", "fsdp")
HEAD_MESH_AXES = ("tensor",)


def linear_axes(in_axis: str | None, out_axis: str | None) -> dict[str, Any]:
    """`nnx.Linear` keyword arguments naming its kernel [in, out] and bias [out] axes."""
    return {"kernel_metadata": {"logical_axes": (in_axis, out_axis)}, "bias_metadata": {"logical_axes": (out_axis,)}}
