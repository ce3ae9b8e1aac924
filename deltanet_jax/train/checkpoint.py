"""Orbax checkpoints of a run: train state, data-iterator position, bookkeeping and config, per step.

Layout: `<run_dir>/checkpoints/<step>/{state, data, meta, config}`; `state` is the TrainState pytree
(model, optimizer state, step), `data` the grain iterator state (JSON; with several processes,
`{"processes": [state of process 0, ...]}`), `meta` small JSON facts (elapsed seconds, seed), `config`
the run's config. Orbax writes each checkpoint into a temporary directory and renames it when
complete, so a step directory is never half written; `restore_latest` also survives a damaged one by
moving it to `<run_dir>/checkpoints-corrupt/` (never deleting or overwriting) and using the one before.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import jax
import orbax.checkpoint as ocp

from deltanet_jax.train.step import TrainState

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "checkpoints-corrupt"
ITEMS = ("state", "data", "meta", "config")


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps with a finished checkpoint under `run_dir` (reads only; creates nothing)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def _abstract(like: Any) -> Any:
    """ShapeDtypeStruct tree of `like` keeping its shardings; leaves without one go to the first local device."""
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def one(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding if sharding is not None else default)

    return jax.tree.map(one, like)


class RunCheckpointer:
    """Saves and restores (TrainState, data-iterator state, meta, config) under `<run_dir>/checkpoints`.

    With `async_save`, `save` returns once the arrays are copied off the devices and the files are
    written in a background thread (the next save, `wait` or `close` waits for it).
    """

    def __init__(self, run_dir: Path, *, keep: int, async_save: bool = False):
        self.run_dir = Path(run_dir)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager((self.run_dir / CHECKPOINT_DIR).absolute(), options=options,
                                              item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: TrainState, data_state: dict[str, Any], meta: dict[str, Any],
             config: dict[str, Any] | None = None) -> None:
        """Write checkpoint `step` (a new directory; older ones beyond `keep` are deleted)."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta),
            config=ocp.args.JsonSave(config or {}),
        )
        self._manager.save(step, args=args, force=True)

    def wait(self) -> None:
        """Block until the last save is on disk."""
        self._manager.wait_until_finished()

    def restore(self, step: int, like: TrainState) -> tuple[TrainState, dict[str, Any], dict[str, Any]]:
        """Checkpoint `step` restored into the structure, shapes, dtypes and shardings of `like` (arrays or
        jax.ShapeDtypeStruct leaves; a leaf without a sharding lands on the first local device), so a
        checkpoint written on one mesh restores onto another. ValueError when they do not match."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(like)), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()
        )
        try:
            restored = self._manager.restore(step, args=args)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"checkpoint {step} does not match the model and optimizer: {err}") from err
        return restored.state, dict(restored.data or {}), dict(restored.meta or {})

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def restore_latest(run_dir: Path, steps: Sequence[int], like: TrainState, *, keep: int
                   ) -> tuple[int, TrainState, dict[str, Any], dict[str, Any]]:
    """Restore the newest of `steps` that reads back whole; (step, state, data_state, meta).

    A checkpoint that fails to restore while an older one succeeds is damaged (e.g. a file cut short
    by a crash): it is moved to `<run_dir>/checkpoints-corrupt/<step>-<time>` (by process 0) with a
    warning, so a later save of that step cannot collide with it. When none restores, RuntimeError
    naming each failure, and nothing is moved (then it is the config, not the files, that is wrong).
    """
    reader = RunCheckpointer(run_dir, keep=max(len(steps), keep, 1))
    failures: list[tuple[int, str]] = []
    try:
        for step in sorted(steps, reverse=True):
            try:
                state, data_state, meta = reader.restore(step, like)
            except Exception as err:  # noqa: BLE001 - any failure to read counts as damage
                failures.append((step, f"{type(err).__name__}: {str(err)[:300]}"))
                continue
            break
        else:
            shown = "; ".join(f"step {s}: {e}" for s, e in failures)
            raise RuntimeError(f"no checkpoint under {Path(run_dir) / CHECKPOINT_DIR} could be restored ({shown})")
    finally:
        reader.close()
    for bad, why in failures:
        moved = _move_aside(Path(run_dir), bad)
        warnings.warn(f"checkpoint {bad} is damaged ({why}); moved to {moved}, resuming from checkpoint {step}",
                      RuntimeWarning, stacklevel=2)
    return step, state, data_state, meta


def _move_aside(run_dir: Path, step: int) -> Path:
    target = run_dir / CORRUPT_DIR / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        (run_dir / CHECKPOINT_DIR / str(step)).rename(target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"moved damaged checkpoint {step}")
    return target
