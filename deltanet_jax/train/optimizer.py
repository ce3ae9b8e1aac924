"""AdamW with linear warmup, cosine decay to a floor, and global-norm gradient clipping."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


def warmup_cosine_schedule(
    *, lr: float, min_lr: float, warmup_steps: int, total_steps: int
) -> Callable[[jax.Array | int], jax.Array]:
    """Learning rate at update `step` (0-based).

    Linear warmup `lr * (step + 1) / (warmup_steps + 1)` for `step < warmup_steps` (so the first
    update is not wasted at lr 0), then a half-cosine from `lr` at `warmup_steps` down to `min_lr`
    at `total_steps`; `min_lr` afterwards.
    """
    if lr <= 0 or min_lr < 0 or min_lr > lr:
        raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got lr={lr}, min_lr={min_lr}")
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}")
    decay_steps = max(total_steps - warmup_steps, 1)

    def schedule(step: jax.Array | int) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = lr * (step + 1.0) / (warmup_steps + 1.0)
        progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
        cosine = min_lr + 0.5 * (lr - min_lr) * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup_steps, warm, cosine)

    return schedule


def decay_mask(params: Any) -> Any:
    """Weight-decay mask: True for matrices and embeddings (ndim >= 2), False for norm scales and biases."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(
    *,
    lr: float,
    min_lr: float,
    warmup_steps: int,
    total_steps: int,
    weight_decay: float = 0.01,
    grad_clip: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
) -> tuple[optax.GradientTransformation, Callable[[jax.Array | int], jax.Array]]:
    """AdamW (decoupled weight decay on `decay_mask` leaves) after clipping by global norm.

    `grad_clip` <= 0 turns clipping off. Returns the transformation and its lr schedule.
    """
    schedule = warmup_cosine_schedule(lr=lr, min_lr=min_lr, warmup_steps=warmup_steps, total_steps=total_steps)
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    parts = []
    if grad_clip > 0:
        parts.append(optax.clip_by_global_norm(grad_clip))
    parts.append(
        optax.adamw(learning_rate=schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    )
    return optax.chain(*parts), schedule
