"""Jitted training and evaluation steps over a split NNX model.

The model is split once into a static graph definition and array state; the steps are pure
functions of a `TrainState` pytree, so they jit (and later shard) without NNX graph traversal
on every call.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

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


def _loss_terms(graphdef: nnx.GraphDef, params: nnx.State, other: nnx.State, batch: Batch):
    model = nnx.merge(graphdef, params, other)
    segment_ids = batch.get("segment_ids")
    logits = model(batch["inputs"], segment_ids=segment_ids)
    mask = batch["targets"] >= 0  # negative targets mark ignored positions
    if segment_ids is not None:
        mask &= segment_ids > 0
    return cross_entropy_sum(logits, batch["targets"], mask)


def make_train_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Jitted `(state, batch) -> (new_state, metrics)`; `state` is donated.

    batch: inputs [B, T] int32, targets [B, T] int32 (< 0 = ignored), optional segment_ids [B, T].
    metrics: loss (mean over counted positions), grad_norm (before clipping).
    """

    def loss_fn(params, other, batch):
        total, count = _loss_terms(graphdef, params, other, batch)
        return total / jnp.maximum(count, 1.0)

    def train_step(state: TrainState, batch: Batch):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, state.other, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, other=state.other)
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(train_step, donate_argnums=0)


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[[TrainState, Batch], tuple[jax.Array, jax.Array]]:
    """Jitted `(state, batch) -> (summed loss, counted positions)` without gradients."""

    @jax.jit
    def eval_step(state: TrainState, batch: Batch):
        return _loss_terms(graphdef, state.params, state.other, batch)

    return eval_step


def evaluate(eval_step: Callable, state: TrainState, batches: list[dict[str, Any]]) -> float:
    """Mean per-token loss over `batches` (float, nats)."""
    total = jnp.zeros((), jnp.float32)
    count = jnp.zeros((), jnp.float32)
    for batch in batches:
        s, c = eval_step(state, batch)
        total, count = total + s, count + c
    return float(total / jnp.maximum(count, 1.0))
