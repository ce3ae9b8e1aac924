"""Language-model evaluation: validation loss, bits per byte, perplexity, and loss by position.

Batches are the data pipelines' dicts: inputs, targets [B, T] int32 (targets < 0 are not scored)
and optionally segment_ids [B, T] (packed documents; 0 = padding). Positions for the length report
count from the start of each token's document (its segment), or of the row when unpacked.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deltanet_jax.model import DeltaNetForCausalLM

_JITTED: "weakref.WeakKeyDictionary[DeltaNetForCausalLM, Any]" = weakref.WeakKeyDictionary()


def _nll_fn(model: DeltaNetForCausalLM):
    """Jitted (params, inputs, targets, segment_ids|None) -> nll [B, T] float32 (0 where not scored)."""
    fn = _JITTED.get(model)
    if fn is None:
        graphdef = nnx.graphdef(model)

        def nll(params, inputs, targets, segment_ids):
            logits = nnx.merge(graphdef, params)(inputs, segment_ids)
            mask = targets >= 0
            if segment_ids is not None:
                mask &= segment_ids > 0
            log_z = jax.nn.logsumexp(logits, axis=-1)
            picked = jnp.take_along_axis(logits, jnp.where(mask, targets, 0)[..., None], axis=-1)[..., 0]
            return jnp.where(mask, log_z - picked, 0.0)

        fn = _JITTED[model] = jax.jit(nll)
    return fn


def scored_mask(batch: dict[str, np.ndarray]) -> np.ndarray:
    """bool [B, T]: the positions whose target is scored."""
    mask = np.asarray(batch["targets"]) >= 0
    if "segment_ids" in batch:
        mask &= np.asarray(batch["segment_ids"]) > 0
    return mask


def token_nll(model: DeltaNetForCausalLM, batch: dict[str, np.ndarray]) -> np.ndarray:
    """Next-token negative log-likelihood (nats) [B, T] float32 of one batch; 0 where not scored."""
    for key in ("inputs", "targets"):
        if key not in batch:
            raise ValueError(f"batch has no {key!r} array (keys: {sorted(batch)})")
    inputs, targets = np.asarray(batch["inputs"]), np.asarray(batch["targets"])
    if inputs.ndim != 2 or inputs.shape != targets.shape:
        raise ValueError(f"inputs and targets must be [B, T] of one shape, got {inputs.shape} and {targets.shape}")
    seg = batch.get("segment_ids")
    if seg is not None and np.asarray(seg).shape != inputs.shape:
        raise ValueError(f"segment_ids shape {np.asarray(seg).shape} must equal inputs shape {inputs.shape}")
    vocab = model.config.vocab_size
    if inputs.min(initial=0) < 0 or inputs.max(initial=0) >= vocab or targets.max(initial=0) >= vocab:
        raise ValueError(f"batch holds token ids outside the model's vocabulary [0, {vocab})")
    out = _nll_fn(model)(nnx.state(model), jnp.asarray(inputs, jnp.int32), jnp.asarray(targets, jnp.int32),
                         None if seg is None else jnp.asarray(seg, jnp.int32))
    return np.asarray(out)


def target_bytes(batch: dict[str, np.ndarray], tokenizer: Any) -> int:
    """UTF-8 bytes of the scored target text of a batch (the tokens themselves for byte tokenizers)."""
    mask = scored_mask(batch)
    if getattr(tokenizer, "spec", None) == "byte" or type(tokenizer).__name__ == "ByteTokenizer":
        return int(mask.sum())
    targets = np.asarray(batch["targets"])
    return sum(len(tokenizer.decode(row[m].tolist()).encode("utf-8")) for row, m in zip(targets, mask))


@dataclasses.dataclass(frozen=True)
class LossReport:
    loss: float  # mean nats per scored token
    tokens: int
    bytes: int
    bits_per_byte: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def to_dict(self) -> dict[str, float]:
        return {"loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "tokens": self.tokens, "bytes": self.bytes}


def evaluate_loss(model: DeltaNetForCausalLM, batches: Sequence[dict[str, np.ndarray]], tokenizer: Any) -> LossReport:
    """Mean next-token loss over `batches`, bits per byte (total nats / ln 2 / bytes of the scored
    text) and perplexity."""
    if not batches:
        raise ValueError("no batches to evaluate")
    total, tokens, nbytes = 0.0, 0, 0
    for batch in batches:
        total += float(np.sum(token_nll(model, batch), dtype=np.float64))
        tokens += int(scored_mask(batch).sum())
        nbytes += target_bytes(batch, tokenizer)
    if tokens == 0:
        raise ValueError("the batches hold no scored tokens")
    return LossReport(loss=total / tokens, tokens=tokens, bytes=nbytes,
                      bits_per_byte=total / math.log(2) / max(nbytes, 1))


def token_positions(batch: dict[str, np.ndarray]) -> np.ndarray:
    """int [B, T]: each input token's position in its document (segment), or in the row."""
    inputs = np.asarray(batch["inputs"])
    b, t = inputs.shape
    if "segment_ids" not in batch:
        return np.broadcast_to(np.arange(t), (b, t)).copy()
    seg = np.asarray(batch["segment_ids"])
    start = np.ones((b, t), bool)
    start[:, 1:] = seg[:, 1:] != seg[:, :-1]
    idx = np.where(start, np.arange(t)[None, :], 0)
    return np.arange(t)[None, :] - np.maximum.accumulate(idx, axis=1)


def position_losses(model: DeltaNetForCausalLM, batches: Sequence[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(mean loss [T] by position (NaN where nothing was scored), scored-token count [T])."""
    if not batches:
        raise ValueError("no batches to evaluate")
    t = np.asarray(batches[0]["inputs"]).shape[1]
    sums, counts = np.zeros(t), np.zeros(t, np.int64)
    for batch in batches:
        nll, mask, pos = token_nll(model, batch), scored_mask(batch), token_positions(batch)
        np.add.at(sums, pos[mask], nll[mask])
        np.add.at(counts, pos[mask], 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan), counts


def bucket_losses(losses: np.ndarray, counts: np.ndarray, width: int) -> list[dict[str, Any]]:
    """Token-weighted mean loss over position buckets [start, start + width)."""
    if width < 1:
        raise ValueError(f"bucket width must be >= 1, got {width}")
    rows = []
    for start in range(0, len(losses), width):
        c = counts[start:start + width]
        n = int(c.sum())
        loss = float(np.nansum(losses[start:start + width] * c) / n) if n else float("nan")
        rows.append({"start": start, "end": min(start + width, len(losses)), "loss": loss, "tokens": n})
    return rows


def plot_position_losses(path: Path, losses: np.ndarray, buckets: list[dict[str, Any]], train_len: int,
                         title: str = "") -> Path:
    """Save a PNG of loss against position: per position (smoothed), bucket means, the training length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    pos = np.arange(len(losses))
    win = max(1, len(losses) // 64)
    ok = ~np.isnan(losses)
    if ok.any():
        smooth = np.convolve(np.where(ok, losses, 0.0), np.ones(win), "same") / np.maximum(
            np.convolve(ok.astype(float), np.ones(win), "same"), 1e-9)
        ax.plot(pos[ok], smooth[ok], linewidth=1, alpha=0.6, label=f"per position (mean of {win})")
    xs = [(b["start"] + b["end"] - 1) / 2 for b in buckets]
    ax.plot(xs, [b["loss"] for b in buckets], "o-", label="bucket mean")
    ax.axvline(train_len, color="gray", linestyle="--", label=f"training length {train_len}")
    ax.set_xlabel("position in sequence")
    ax.set_ylabel("cross-entropy (nats/token)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
