"""The training loop of a run: model, optimizer, data, periodic validation, metrics, checkpoints."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm.auto import tqdm

from deltanet_jax.data import load_corpus, train_iterator, validation_batches
from deltanet_jax.model import DeltaNetForCausalLM
from deltanet_jax.train.checkpoint import RunCheckpointer
from deltanet_jax.train.config import RunConfig
from deltanet_jax.train.metrics import MetricsWriter, plot_losses, truncate_metrics, write_config
from deltanet_jax.train.optimizer import make_optimizer
from deltanet_jax.train.run_dir import RunDirPlan
from deltanet_jax.train.step import TrainState, evaluate, init_train_state, make_eval_step, make_train_step


@dataclasses.dataclass(frozen=True)
class RunResult:
    step: int  # updates applied in total
    val_loss: float  # nats per token on the validation windows
    run_dir: Path

    @property
    def val_ppl(self) -> float:
        return math.exp(self.val_loss)


def compute_dtype(name: str) -> jnp.dtype:
    """`auto` -> bfloat16 on GPU/TPU, float32 on CPU (where bfloat16 matmuls are slower)."""
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    return jnp.dtype(name)


def build_model(config: RunConfig) -> DeltaNetForCausalLM:
    """The model of `config` with freshly initialised float32 parameters (seeded by train.seed)."""
    return DeltaNetForCausalLM(
        config.model,
        rngs=nnx.Rngs(config.train.seed),
        dtype=compute_dtype(config.train.dtype),
        param_dtype=jnp.float32,
        implementation=config.train.implementation,
        remat=config.train.remat,
    )


def train(
    config: RunConfig, plan: RunDirPlan, *, progress: bool = True, out: TextIO | None = None
) -> RunResult:
    """Train (or continue training) the run planned by `plan_run_dir`; returns the final validation loss.

    Nothing is written before the model is built and any checkpoint to resume from is restored.
    """
    out = sys.stdout if out is None else out
    tc = config.train
    run_dir = plan.run_dir
    splits = load_corpus(config.data.corpus)
    model = build_model(config)
    n_params = sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    tx, schedule = make_optimizer(
        lr=tc.lr, min_lr=tc.min_lr, warmup_steps=tc.warmup_steps, total_steps=tc.steps,
        weight_decay=tc.weight_decay, grad_clip=tc.grad_clip, b1=tc.b1, b2=tc.b2,
    )
    graphdef, state = init_train_state(model, tx)
    del model
    data = train_iterator(
        splits.train, seq_len=tc.seq_len, batch_size=tc.batch_size, seed=tc.seed,
        prefetch_threads=config.data.prefetch_threads,
    )
    val_batches = validation_batches(
        splits.validation, seq_len=tc.seq_len, batch_size=tc.batch_size, num_batches=tc.eval_batches
    )

    elapsed_before = 0.0
    if plan.resume_step is not None:
        reader = RunCheckpointer(run_dir, keep=config.checkpoint.keep)
        state, data_state, meta = reader.restore(plan.resume_step, state)
        reader.close()
        if data_state:  # empty for a run written from converted weights: start the data from the top
            data.set_state(data_state)
        elapsed_before = float(meta.get("elapsed", 0.0))
    start = int(state.step)

    # From here on the run directory is written.
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, config.to_dict())
    records = truncate_metrics(run_dir, start)
    checkpointer = RunCheckpointer(run_dir, keep=config.checkpoint.keep)
    writer = MetricsWriter(run_dir)
    device = jax.devices()[0]
    what = f"resuming at step {start}" if plan.resume_step is not None else "starting"
    print(
        f"{what}: {n_params:,} parameters, {device.platform} ({device.device_kind}), "
        f"compute {jnp.dtype(compute_dtype(tc.dtype)).name}, run dir {run_dir}",
        file=out,
    )
    for change in plan.changed:
        print(f"  changed since the last run: {change}", file=out)

    train_step = make_train_step(graphdef, tx)
    eval_step = make_eval_step(graphdef)
    tokens_per_step = tc.batch_size * tc.seq_len
    t0 = time.perf_counter()
    step = start
    saved_step = plan.resume_step
    val_loss = math.nan

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t0

    # Data-iterator position after `step` batches, and after the batch being trained on now.
    committed = (step, dict(data.get_state()))
    pending = committed

    def save() -> None:
        nonlocal saved_step
        at = int(state.step)
        if saved_step != at:
            data_state = pending[1] if at == pending[0] else committed[1]
            checkpointer.save(at, state, data_state, {"elapsed": elapsed()})
            saved_step = at

    bar = tqdm(total=tc.steps, initial=start, disable=not progress, unit="step", dynamic_ncols=True, file=sys.stderr)
    losses: list[jax.Array] = []
    interval_start, interval_steps = time.perf_counter(), 0
    try:
        while step < tc.steps:
            batch = next(data)
            pending = (step + 1, dict(data.get_state()))
            state, metrics = train_step(state, batch)
            step += 1
            committed = pending
            interval_steps += 1
            losses.append(metrics["loss"])
            bar.update(1)
            is_eval = step % tc.eval_every == 0 or step == tc.steps
            if step % tc.log_every == 0 or is_eval:
                loss = float(jnp.mean(jnp.stack(losses)))
                if not math.isfinite(loss):
                    raise FloatingPointError(f"training loss became {loss} at step {step}")
                tokens_per_s = interval_steps * tokens_per_step / (time.perf_counter() - interval_start)
                record: dict[str, Any] = {
                    "step": step,
                    "loss": loss,
                    "lr": float(schedule(step - 1)),
                    "grad_norm": float(metrics["grad_norm"]),
                    "tokens_per_s": tokens_per_s,
                    "tokens": step * tokens_per_step,
                    "elapsed": elapsed(),
                }
                postfix = {"loss": f"{loss:.3f}", "tok/s": f"{tokens_per_s:,.0f}"}
                if is_eval:
                    val_loss = evaluate(eval_step, state, val_batches)
                    record.update(val_loss=val_loss, val_ppl=math.exp(val_loss), elapsed=elapsed())
                    postfix["val"] = f"{val_loss:.3f}"
                writer.write(record)
                records.append(record)
                bar.set_postfix(postfix, refresh=False)
                if is_eval:
                    plot_losses(run_dir, records)
                losses.clear()
                interval_start, interval_steps = time.perf_counter(), 0
            if config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0:
                save()
        save()
    except KeyboardInterrupt:
        bar.close()
        try:
            save()
            print(f"interrupted: checkpoint of step {saved_step} saved; run the same command to resume", file=out)
        except Exception as err:  # e.g. interrupted while the state's buffers were handed to a step
            print(f"interrupted: no checkpoint written ({err}); the last one is of step {saved_step}", file=out)
        raise
    finally:
        bar.close()
        writer.close()
        checkpointer.close()

    if math.isnan(val_loss):  # nothing left to train: report the restored model
        val_loss = evaluate(eval_step, state, val_batches)
    plot_losses(run_dir, records)
    print(f"final val_loss {val_loss:.4f} (ppl {math.exp(val_loss):.2f}) at step {step}", file=out)
    return RunResult(step=step, val_loss=val_loss, run_dir=run_dir)
