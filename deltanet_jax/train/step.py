"""Jitted training and evaluation steps over a split NNX model.

The model is split once into a static graph definition and array state; the steps are pure
functions of a `TrainState` pytree, so they jit (and later shard) without NNX graph traversal
on every call.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

Batch = dict[str, jax.Array]


class TrainState(NamedTuple):
    """Everything a training step reads and writes; a pytree (checkpointed as is)."""

    step: jax.Array  # int32 scalar: updates applied so far
    params: nnx.State  # trainable nnx.Param leaves, float32
    opt_state: optax.OptState
    other: nnx.State  # non-trainable model state, carried unchanged


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState]:
    """Split `model` into (graph definition, initial TrainState with a fresh optimizer state)."""
    graphdef, params, other = nnx.split(model, nnx.Param, ...)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), other=other)
    return graphdef, state


def cross_entropy_sum(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy in float32 and the number of counted positions.

    logits [B, T, V], targets [B, T] int, mask [B, T] bool (False = ignored position).
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    safe_targets = jnp.where(mask, targets, 0)
    target_logit = jnp.take_along_axis(logits, safe_targets[..., None], axis=-1)[..., 0]
    nll = jnp.where(mask, log_z - target_logit, 0.0)
    return nll.sum(), mask.sum().astype(jnp.float32)


def chunked_cross_entropy_sum(h: jax.Array, w: jax.Array, project: Callable[..., jax.Array],
                              targets: jax.Array, mask: jax.Array, chunk: int,
                              row_groups: int = 1) -> tuple[jax.Array, jax.Array]:
    """`cross_entropy_sum` of the logits `project(h, w)` without the [B, T, vocab] array: positions
    go `chunk` at a time through a scan, so at most one [B, chunk, vocab] block of float32 logits
    is alive at a time.

    Differentiated, the forward pass also forms the gradients: each chunk's float32 logits turn at
    once into their gradient (`softmax - onehot` at counted positions), cast to h's dtype, and through `project`'s
    transpose into the chunk's share of dh and dw, so the backward only scales them (no logits
    kept, none recomputed: the matmul work of one forward and one backward).

    h [B, T, D] final hidden states; w the output projection; targets, mask [B, T];
    `project(h, w, dtype=float32)` pure in (h, w), logits in `dtype`. T need not be a multiple of
    `chunk` (the tail is padded with masked positions).
    Chunks split the sequence axis, so a batch-sharded h stays sharded inside the scan.
    `row_groups` > 1 (the number of batch shards; B must divide by it) sums the gradient of w and
    the loss over each block of B / row_groups rows apart and adds the blocks up after the scan:
    with rows split over devices, each device accumulates its own partial sums and the cross-device
    reduction runs once, not once per chunk.
    """
    if row_groups < 1 or h.shape[0] % row_groups:
        raise ValueError(f"row_groups must be >= 1 and divide the batch {h.shape[0]}, got {row_groups}")
    return _chunked_ce(h, w, targets, mask, project, chunk, row_groups)


def _split_chunks(h, targets, mask, chunk):
    """[B, T, ...] -> [n, B, chunk, ...] (T padded to n * chunk with masked positions)."""
    b, t = h.shape[:2]
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    split = lambda x: x.reshape((b, n, chunk) + x.shape[2:]).swapaxes(0, 1)  # noqa: E731
    return split(h), split(targets), split(mask)


def _chunk_terms(hc, tc, mc, w, project):
    """One chunk's (total, count, dh, dw float32), its logits' gradient formed at once."""
    logits = project(hc, w).astype(jnp.float32)
    (total, count), ce_pullback = jax.vjp(lambda x: cross_entropy_sum(x, tc, mc), logits)
    dlogits = ce_pullback((jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32)))[0].astype(hc.dtype)
    # The transpose of a projection with logits in h's dtype: both gradient matmuls take
    # compute-dtype operands (a float32 cotangent would make them float32 matmuls).
    _, pullback = jax.vjp(functools.partial(project, dtype=hc.dtype), hc, w)
    dh, dw = pullback(dlogits)
    return total, count, dh, dw.astype(jnp.float32)


def _ce_scan(h, w, targets, mask, project, chunk, with_grads: bool, row_groups: int = 1):
    """(total, count) and, `with_grads`, (dh, dw): the gradients of total. With `row_groups` > 1 the
    gradient's terms are summed per block of rows inside the scan and over the blocks after it."""
    hs, ts, ms = _split_chunks(h, targets, mask, chunk)
    zero = jnp.zeros((), jnp.float32)

    if not with_grads:
        def body(carry, xs):
            total, count = cross_entropy_sum(project(xs[0], w), *xs[1:])
            return (carry[0] + total, carry[1] + count), None

        (total, count), _ = jax.lax.scan(body, (zero, zero), (hs, ts, ms))
        return (total, count), None

    one = functools.partial(_chunk_terms, w=w, project=project)

    def per_block(hc, tc, mc):
        """[B, ...] -> [G, B / G, ...]: the terms of each block of rows apart, dh back as [B, ...]."""
        blocks = lambda x: x.reshape((row_groups, -1) + x.shape[1:])  # noqa: E731
        total, count, dh, dw = jax.vmap(one)(blocks(hc), blocks(tc), blocks(mc))
        return total, count, dh.reshape(hc.shape), dw

    terms = per_block if row_groups > 1 else one

    def body(carry, xs):
        total, count, dh, dw = terms(*xs)
        return (carry[0] + total, carry[1] + count, carry[2] + dw), dh

    lead = (row_groups,) if row_groups > 1 else ()
    init = (jnp.zeros(lead, jnp.float32), jnp.zeros(lead, jnp.float32), jnp.zeros(lead + w.shape, jnp.float32))
    (total, count, dw), dhs = jax.lax.scan(body, init, (hs, ts, ms))
    if row_groups > 1:
        total, count, dw = total.sum(0), count.sum(0), dw.sum(0)
    b, t = h.shape[:2]
    dh = dhs.swapaxes(0, 1).reshape((b, -1) + h.shape[2:])[:, :t]
    return (total, count), (dh, dw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked_ce(h, w, targets, mask, project, chunk, row_groups):
    return _ce_scan(h, w, targets, mask, project, chunk, with_grads=False)[0]


def _chunked_ce_fwd(h, w, targets, mask, project, chunk, row_groups):
    out, (dh, dw) = _ce_scan(h, w, targets, mask, project, chunk, with_grads=True, row_groups=row_groups)
    return out, (dh, dw, jnp.zeros((0,), w.dtype), targets, mask)  # an empty array carries w's dtype


def _chunked_ce_bwd(project, chunk, row_groups, res, cotangents):
    dh, dw, w_like, targets, mask = res
    g = cotangents[0]  # of the summed loss; the count has no gradient
    zeros = lambda x: np.zeros(x.shape, jax.dtypes.float0)  # noqa: E731  integer / bool inputs
    return (g * dh).astype(dh.dtype), (g * dw).astype(w_like.dtype), zeros(targets), zeros(mask)


_chunked_ce.defvjp(_chunked_ce_fwd, _chunked_ce_bwd)


def labelled_rows(h: jax.Array, targets: jax.Array, mask: jax.Array, slots: int):
    """The first `slots` counted positions of each row, in order (padded with uncounted ones):
    h [B, T, D], targets and mask [B, T] -> [B, slots, D], [B, slots], [B, slots]. Counted
    positions past the first `slots` of a row are left out."""
    order = jnp.argsort((~mask).astype(jnp.int8), axis=1, stable=True)[:, :slots]  # counted positions first
    take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)  # noqa: E731
    return take(h), take(targets), take(mask)


def _loss_terms(graphdef: nnx.GraphDef, params: nnx.State, other: nnx.State, batch: Batch, loss_chunk: int = 0,
                label_slots: int = 0, row_groups: int = 1):
    model = nnx.merge(graphdef, params, other)
    segment_ids = batch.get("segment_ids")
    targets = batch["targets"]
    mask = targets >= 0  # negative targets mark ignored positions
    if segment_ids is not None:
        mask &= segment_ids > 0
    h = model.hidden(batch["inputs"], segment_ids)
    if label_slots:
        h, targets, mask = labelled_rows(h, targets, mask, label_slots)
    t = h.shape[1]
    chunk = min(loss_chunk, t) if loss_chunk else t  # 0: one chunk, still with the gradients formed early
    return chunked_cross_entropy_sum(h, model.head_weight(), model.project, targets, mask, chunk, row_groups)


def batch_shards(batch_sharding: NamedSharding | None) -> int:
    """How many blocks of rows `batch_sharding` splits a batch into (1 without one)."""
    if batch_sharding is None or not batch_sharding.spec:
        return 1
    axes = batch_sharding.spec[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(batch_sharding.mesh.shape[a] for a in axes)


def _micro_batches(batch: Batch, grad_accum: int, batch_sharding: NamedSharding | None) -> Batch:
    """[B, T] arrays -> [grad_accum, B / grad_accum, T]; micro-batch m holds rows m, m + k, m + 2k, ...
    so every device keeps contributing rows of its own shard to each micro-batch."""

    def split(x):
        b = x.shape[0]
        x = x.reshape((b // grad_accum, grad_accum) + x.shape[1:]).swapaxes(0, 1)
        if batch_sharding is not None:
            spec = PartitionSpec(None, *batch_sharding.spec)
            x = jax.lax.with_sharding_constraint(x, NamedSharding(batch_sharding.mesh, spec))
        return x

    return {name: split(x) for name, x in batch.items()}


def make_train_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *, grad_accum: int = 1,
    skip_nonfinite: bool = False, state_sharding: Any = None, batch_sharding: NamedSharding | None = None,
    compute_sharding: Any = None, loss_chunk: int = 0, label_slots: int = 0,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Jitted `(state, batch) -> (new_state, metrics)`; `state` is donated.

    batch: inputs [B, T] int32, targets [B, T] int32 (< 0 = ignored), optional segment_ids [B, T].
    `grad_accum` > 1 sums gradients over that many micro-batches (B must divide) in a scan, so the
    update equals one over the whole batch with less activation memory. `skip_nonfinite` leaves
    parameters and optimizer state unchanged when the loss or a gradient is NaN/inf.
    `state_sharding` / `batch_sharding` (NamedSharding trees) pin the layouts for sharded training;
    `compute_sharding` (a tree like the params) is the layout parameters are gathered to for use (FSDP).
    `loss_chunk` > 0 computes logits and loss that many positions at a time (`chunked_cross_entropy_sum`).
    `label_slots` > 0 computes logits only at each row's first `label_slots` counted positions
    (`labelled_rows`): the same loss, for tasks with few labelled positions per row (recall tasks).
    metrics: loss (mean over counted positions), grad_norm (before clipping), finite (bool).
    """

    groups = batch_shards(batch_sharding)  # the loss sums its weight gradient per device's rows

    def gather(params):
        return params if compute_sharding is None else jax.lax.with_sharding_constraint(params, compute_sharding)

    def loss_fn(params, other, batch):
        total, count = _loss_terms(graphdef, gather(params), other, batch, loss_chunk, label_slots, groups)
        return total / jnp.maximum(count, 1.0)

    def sum_fn(params, other, batch):
        total, count = _loss_terms(graphdef, gather(params), other, batch, loss_chunk, label_slots, groups)
        return total, count

    def loss_and_grads(params, other, batch):
        if grad_accum == 1:
            return jax.value_and_grad(loss_fn)(params, other, batch)
        micro = _micro_batches(batch, grad_accum, batch_sharding)

        def body(carry, mb):
            grads, total, count = carry
            (t, c), g = jax.value_and_grad(sum_fn, has_aux=True)(params, other, mb)
            return (jax.tree.map(jnp.add, grads, g), total + t, count + c), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (grads, total, count), _ = jax.lax.scan(body, init, micro)
        count = jnp.maximum(count, 1.0)
        return total / count, jax.tree.map(lambda g: g / count, grads)

    def train_step(state: TrainState, batch: Batch):
        loss, grads = loss_and_grads(state.params, state.other, batch)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if skip_nonfinite:
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
            params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, other=state.other)
        return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}

    if state_sharding is None:
        return jax.jit(train_step, donate_argnums=0)
    replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
    return jax.jit(train_step, donate_argnums=0, in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, replicated))


def make_eval_step(graphdef: nnx.GraphDef, *, state_sharding: Any = None,
                   batch_sharding: NamedSharding | None = None, compute_sharding: Any = None, loss_chunk: int = 0,
                   label_slots: int = 0) -> Callable[[TrainState, Batch], tuple[jax.Array, jax.Array]]:
    """Jitted `(state, batch) -> (summed loss, counted positions)` without gradients (shardings,
    `loss_chunk` and `label_slots` as in `make_train_step`)."""

    def eval_step(state: TrainState, batch: Batch):
        params = state.params
        if compute_sharding is not None:
            params = jax.lax.with_sharding_constraint(params, compute_sharding)
        return _loss_terms(graphdef, params, state.other, batch, loss_chunk, label_slots)

    if state_sharding is None:
        return jax.jit(eval_step)
    replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
    return jax.jit(eval_step, in_shardings=(state_sharding, batch_sharding), out_shardings=(replicated, replicated))


def evaluate(eval_step: Callable, state: TrainState, batches: list[dict[str, Any]]) -> float:
    """Mean per-token loss over `batches` (float, nats)."""
    total = jnp.zeros((), jnp.float32)
    count = jnp.zeros((), jnp.float32)
    for batch in batches:
        s, c = eval_step(state, batch)
        total, count = total + s, count + c
    return float(total / jnp.maximum(count, 1.0))
