"""A run directory's model for tools other than the trainer: load one, or write one from weights.

`load_model(run_dir)` rebuilds the model of `config.json` and fills it with the parameters of the
latest (or a chosen) checkpoint. `write_model_run(run_dir, config, model)` writes a fresh run
directory (config.json + a step-0 checkpoint with a new optimizer state) around given weights, so a
converted checkpoint is loaded, evaluated, sampled and fine-tuned like any trained run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from deltanet_jax.model import DeltaNetForCausalLM
from deltanet_jax.train.checkpoint import RunCheckpointer, checkpoint_steps
from deltanet_jax.train.config import RunConfig
from deltanet_jax.train.metrics import CONFIG_FILE, read_config, write_config
from deltanet_jax.train.optimizer import make_optimizer
from deltanet_jax.train.step import TrainState, init_train_state


@dataclasses.dataclass
class LoadedModel:
    model: DeltaNetForCausalLM
    config: RunConfig
    step: int  # the checkpoint's step (updates applied)


def _optimizer(config: RunConfig):
    tc = config.train
    tx, _ = make_optimizer(
        lr=tc.lr, min_lr=tc.min_lr, warmup_steps=tc.warmup_steps, total_steps=tc.steps,
        weight_decay=tc.weight_decay, grad_clip=tc.grad_clip, b1=tc.b1, b2=tc.b2,
    )
    return tx


def read_run_config(run_dir: Path) -> RunConfig:
    """The RunConfig of `run_dir/config.json`; ValueError naming the file when absent or invalid."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise ValueError(f"{run_dir} has no {CONFIG_FILE}: not a run directory")
    try:
        return RunConfig.from_dict(read_config(run_dir))
    except ValueError as err:
        raise ValueError(f"{run_dir / CONFIG_FILE} cannot be used: {err}") from err


def load_model(
    run_dir: Path,
    *,
    step: int | None = None,
    dtype: jnp.dtype | None = None,
    implementation: str | None = None,
) -> LoadedModel:
    """The model of `run_dir` with the parameters of checkpoint `step` (default: the latest).

    `dtype` is the compute dtype (default: the run's `train.dtype`), `implementation` the
    delta-rule kernel (default: the best for the backend). Raises ValueError when the directory
    has no config, no checkpoint, or a checkpoint that does not fit the config.
    """
    from deltanet_jax.train.trainer import compute_dtype

    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    steps = checkpoint_steps(run_dir)
    if not steps:
        raise ValueError(f"{run_dir} has no checkpoint (nothing under {run_dir / 'checkpoints'})")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"{run_dir} has no checkpoint of step {step} (it has {steps})")
    dtype = compute_dtype(config.train.dtype) if dtype is None else dtype
    tx = _optimizer(config)

    def build() -> DeltaNetForCausalLM:
        return DeltaNetForCausalLM(config.model, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=jnp.float32,
                                   implementation=implementation)

    abstract_model = nnx.eval_shape(build)
    graphdef, abstract_state = _abstract_state(abstract_model, tx)
    reader = RunCheckpointer(run_dir, keep=max(len(steps), 1))
    try:
        state, _, _ = reader.restore(step, abstract_state)
    finally:
        reader.close()
    model = nnx.merge(graphdef, state.params, state.other)
    return LoadedModel(model=model, config=config, step=int(state.step))


def _abstract_state(abstract_model: nnx.Module, tx) -> tuple[nnx.GraphDef, TrainState]:
    graphdef, params, other = nnx.split(abstract_model, nnx.Param, ...)
    opt_state = jax.eval_shape(tx.init, params)
    return graphdef, TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_state,
                                other=other)


def write_model_run(run_dir: Path, config: RunConfig, model: DeltaNetForCausalLM) -> None:
    """Write a new run directory holding `config` and `model`'s parameters as checkpoint 0.

    Refuses (ValueError, nothing written) when `run_dir` exists and is not empty, or when the
    model's configuration differs from `config.model`.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ValueError(f"{run_dir} exists and is not empty; choose a new directory")
    if model.config != config.model:
        raise ValueError("the model's configuration differs from config.model")
    _, state = init_train_state(model, _optimizer(config))
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, config.to_dict())
    writer = RunCheckpointer(run_dir, keep=config.checkpoint.keep)
    try:
        writer.save(0, state, {}, {"elapsed": 0.0, "source": "write_model_run"})
    finally:
        writer.close()
