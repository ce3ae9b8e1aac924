"""Sharding rules: logical parameter axes (see `deltanet_jax.nn.axes`) onto the mesh axes
("data", "fsdp", "tensor"), and the shardings of a whole `TrainState` and of batches.

Default rules: "embed" -> fsdp (FSDP shards every matrix along the model width), "heads",
"kv_heads", "mlp", "vocab" -> tensor (tensor parallelism over heads, the MLP and the vocabulary),
"norm" and unnamed axes replicated; the batch goes over data x fsdp. A mesh axis of size 1 is left
out of a spec, and an array axis that its mesh axes do not divide is replicated instead.
Optimizer moments take the sharding of the parameter they belong to.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deltanet_jax.train.mesh import BATCH_AXES

MeshAxes = str | tuple[str, ...] | None

DEFAULT_RULES: Mapping[str, MeshAxes] = {
    "batch": BATCH_AXES,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
}


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(logical: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, MeshAxes] = DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec of an array of `shape` whose axes carry the `logical` names.

    Unknown logical names raise ValueError; mesh axes of size 1, axes already used by an earlier
    dimension, and mesh axes that do not divide the dimension are dropped (that dimension is then
    replicated over them).
    """
    if logical is None:
        return PartitionSpec()
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} do not match an array of shape {tuple(shape)}")
    used: set[str] = set()
    out: list[MeshAxes] = []
    for name, dim in zip(logical, shape):
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise ValueError(f"no sharding rule for logical axis {name!r} (rules: {sorted(rules)})")
        axes = tuple(a for a in _as_tuple(rules[name]) if mesh.shape.get(a, 1) > 1 and a not in used)
        if axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes = ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def variable_shardings(state: Any, mesh: Mesh, rules: Mapping[str, MeshAxes] = DEFAULT_RULES) -> Any:
    """Tree like `state` (an nnx.State of Variables with array or ShapeDtypeStruct values) holding a
    NamedSharding per array, from each Variable's `logical_axes` metadata (replicated without)."""

    def one(v):
        if not _is_variable(v):
            return NamedSharding(mesh, PartitionSpec())
        value = v.get_value()
        spec = logical_to_spec(v.get_metadata().get("logical_axes"), value.shape, mesh, rules)
        return v.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=_is_variable)


def _path_key(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_shardings(state: Any, mesh: Mesh, rules: Mapping[str, MeshAxes] = DEFAULT_RULES) -> Any:
    """NamedSharding tree for a TrainState (arrays or ShapeDtypeStructs): parameters and other model
    state by their logical axes; an optimizer leaf takes the sharding of the parameter whose tree path
    ends its own path (Adam's mu and nu mirror the parameters) and has its shape; the rest replicated."""
    params = variable_shardings(state.params, mesh, rules)
    by_path: dict[tuple[str, ...], tuple[tuple[int, ...], NamedSharding]] = {}
    for (path, shard), (_, leaf) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                        jax.tree_util.tree_flatten_with_path(state.params)[0]):
        by_path[_path_key(path)] = (tuple(leaf.shape), shard)
    replicated = NamedSharding(mesh, PartitionSpec())

    def opt_leaf(path, leaf):
        key = _path_key(path)
        for start in range(len(key)):
            hit = by_path.get(key[start:])
            if hit is not None and hit[0] == tuple(getattr(leaf, "shape", ())):
                return hit[1]
        return replicated

    opt = jax.tree_util.tree_map_with_path(opt_leaf, state.opt_state)
    other = variable_shardings(state.other, mesh, rules)
    return type(state)(step=replicated, params=params, opt_state=opt, other=other)


def gathered(shardings: Any, axis: str = "fsdp") -> Any:
    """The shardings with mesh `axis` removed: how FSDP-sharded parameters are used inside the step
    (all-gathered along fsdp right before use, so activations stay split over the batch; their
    gradients are reduce-scattered back to the stored sharding)."""

    def drop(entry):
        axes = tuple(a for a in _as_tuple(entry) if a != axis)
        return None if not axes else axes[0] if len(axes) == 1 else axes

    return jax.tree.map(lambda s: NamedSharding(s.mesh, PartitionSpec(*(drop(e) for e in s.spec))), shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a [B, T] batch array: rows split over data x fsdp, T whole."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(axes, None))


def describe(shardings: Any) -> dict[str, str]:
    """Tree path -> PartitionSpec text of every leaf of a sharding tree (for logs and tests)."""
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    return {jax.tree_util.keystr(path): str(s.spec) for path, s in flat}
