"""`delta_rule` on arrays sharded over batch and heads: each device runs the op on its own shard
inside `jax.shard_map` (the Pallas kernels accept no sharded operands; the rule never mixes batch
rows or heads, so no communication is needed)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
from jax.sharding import Mesh, PartitionSpec as P

from deltanet_jax.ops.api import delta_rule


def _axes(names: Sequence[str], mesh: Mesh, what: str):
    names = tuple(names)
    unknown = [n for n in names if n not in mesh.axis_names]
    if unknown:
        raise ValueError(f"{what} {unknown} are not axes of the mesh {tuple(mesh.axis_names)}")
    return names or None


def delta_rule_sharded(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array, *, mesh: Mesh,
                       batch_axes: Sequence[str] = ("data", "fsdp"), head_axes: Sequence[str] = ("tensor",),
                       scale: Optional[float] = None, initial_state: Optional[jax.Array] = None,
                       output_final_state: bool = False, segment_ids: Optional[jax.Array] = None,
                       qk_l2norm: bool = False, implementation: Optional[str] = None,
                       ) -> tuple[jax.Array, Optional[jax.Array]]:
    """`delta_rule` with B split over `batch_axes` and H over `head_axes` of `mesh` (axes of the
    mesh not named are replicated). Same arguments and results as `delta_rule`; B and H must
    divide by the sizes of their axes."""
    batch = _axes(batch_axes, mesh, "batch_axes")
    heads = _axes(head_axes, mesh, "head_axes")
    B, _, H, K = q.shape
    size = lambda names: math.prod(mesh.shape[n] for n in names or ())
    if B % size(batch) or H % size(heads):
        raise ValueError(f"batch {B} must divide by {size(batch)} ({batch_axes}) and heads {H} by "
                         f"{size(heads)} ({head_axes}) of the mesh {dict(mesh.shape)}")
    scale = K ** -0.5 if scale is None else float(scale)
    seq, tok, state = P(batch, None, heads, None), P(batch, None, heads), P(batch, heads, None, None)
    args, specs = [q, k, v, beta], [seq, seq, seq, tok]
    has_h0, has_seg = initial_state is not None, segment_ids is not None
    if has_h0:
        args.append(initial_state)
        specs.append(state)
    if has_seg:
        args.append(segment_ids)
        specs.append(P(batch, None))

    def local(*a):
        h0 = a[4] if has_h0 else None
        seg = a[4 + has_h0] if has_seg else None
        o, s = delta_rule(*a[:4], scale=scale, initial_state=h0, output_final_state=output_final_state,
                          segment_ids=seg, qk_l2norm=qk_l2norm, implementation=implementation)
        return (o, s) if output_final_state else o

    out_specs = (seq, state) if output_final_state else seq
    out = jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=out_specs, check_vma=False)(*args)
    return out if output_final_state else (out, None)
