"""Orbax checkpoints of a run: train state, data-iterator position and bookkeeping, per step.

Layout: `<run_dir>/checkpoints/<step>/{state, data, meta}`; `state` is the TrainState pytree,
`data` the grain iterator state (JSON), `meta` small JSON facts (e.g. elapsed seconds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from deltanet_jax.train.step import TrainState

CHECKPOINT_DIR = "checkpoints"


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps with a finished checkpoint under `run_dir` (reads only; creates nothing)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


class RunCheckpointer:
    """Saves and restores (TrainState, data-iterator state, meta) under `<run_dir>/checkpoints`."""

    def __init__(self, run_dir: Path, *, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(
            (Path(run_dir) / CHECKPOINT_DIR).absolute(), options=options, item_names=("state", "data", "meta")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: TrainState, data_state: dict[str, Any], meta: dict[str, Any]) -> None:
        """Write checkpoint `step` (replacing none; older ones beyond `keep` are deleted)."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)
        )
        self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()

    def restore(self, step: int, like: TrainState) -> tuple[TrainState, dict[str, Any], dict[str, Any]]:
        """Checkpoint `step` restored into the structure, shapes and dtypes of `like` (arrays or
        jax.ShapeDtypeStruct leaves); raises ValueError when they do not match."""
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()
        )
        try:
            restored = self._manager.restore(step, args=args)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"checkpoint {step} does not match the model and optimizer: {err}") from err
        return restored.state, dict(restored.data), dict(restored.meta)

    def close(self) -> None:
        self._manager.close()
