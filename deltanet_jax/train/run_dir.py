"""Checks that decide, before anything is written, whether a run directory starts fresh or resumes."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from deltanet_jax.model import DeltaNetConfig
from deltanet_jax.train.checkpoint import checkpoint_steps
from deltanet_jax.train.config import RunConfig
from deltanet_jax.train.metrics import CONFIG_FILE, read_config


class RunDirError(ValueError):
    """The run directory cannot be used for this config; nothing in it was changed."""


@dataclasses.dataclass(frozen=True)
class RunDirPlan:
    """What a run will do with its directory."""

    run_dir: Path
    resume_step: int | None  # latest checkpoint to continue from, None = start from step 0
    changed: tuple[str, ...]  # `section.field: old -> new` for settings that differ from config.json


def plan_run_dir(run_dir: Path, config: RunConfig) -> RunDirPlan:
    """Inspect `run_dir` (read only) and decide how to use it.

    - missing or empty: fresh run;
    - holding config.json: the model and data sections must equal this config's (RunDirError
      naming the differing keys otherwise); continue from the latest checkpoint if there is one;
    - holding anything else without config.json: RunDirError (not a run directory).
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run dir {run_dir} exists and is not a directory")
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return RunDirPlan(run_dir, None, ())
    if not (run_dir / CONFIG_FILE).is_file():
        raise RunDirError(f"run dir {run_dir} is not empty and has no {CONFIG_FILE}: not a run directory")
    try:
        old = read_config(run_dir)
        if not isinstance(old, dict) or not isinstance(old.get("model"), dict):
            raise ValueError("it has no 'model' section")
        old_model = DeltaNetConfig.from_dict(old["model"]).to_dict()
    except ValueError as err:
        raise RunDirError(f"{run_dir / CONFIG_FILE} cannot be read: {err}") from err
    new = config.to_dict()
    model_diff = _differences("model", old_model, new["model"])
    data_diff = _differences("data", {"corpus": old.get("data", {}).get("corpus")}, {"corpus": config.data.corpus})
    if model_diff or data_diff:
        raise RunDirError(
            f"run dir {run_dir} holds a run of another model or corpus ({'; '.join(model_diff + data_diff)}); "
            "choose another --run-dir or the same settings"
        )
    changed = []
    for section in ("train", "checkpoint", "mesh", "data"):
        if isinstance(old.get(section), dict):
            changed += _differences(section, old[section], new[section])
    steps = checkpoint_steps(run_dir)
    return RunDirPlan(run_dir, steps[-1] if steps else None, tuple(changed))


def _differences(section: str, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [
        f"{section}.{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]
