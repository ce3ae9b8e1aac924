"""The training loop of a run: mesh, sharded model and optimizer, data, periodic validation, metrics,
checkpoints, and a clean stop on SIGTERM / SIGINT."""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from deltanet_jax.model import DeltaNetForCausalLM
from deltanet_jax.train.checkpoint import RunCheckpointer, checkpoint_steps, restore_latest
from deltanet_jax.train.config import RunConfig
from deltanet_jax.train.data_source import TrainData, make_train_data
from deltanet_jax.train.distributed import any_process, gather_json, global_batch, process_rows
from deltanet_jax.train.flops import device_memory_gib, peak_flops, train_flops_per_token
from deltanet_jax.train.mesh import (build_mesh, check_batch, check_mesh_fits, resolve_mesh_shape,
                                     unused_devices_text)
from deltanet_jax.train.metrics import (MetricsWriter, plot_losses, plot_throughput, truncate_metrics,
                                        write_config)
from deltanet_jax.train.optimizer import make_optimizer
from deltanet_jax.train.run_dir import RunDirPlan
from deltanet_jax.train.sharding import batch_sharding, gathered, state_shardings
from deltanet_jax.train.step import TrainState, evaluate, init_train_state, make_eval_step, make_train_step


STOP_CHECK_EVERY = 10  # steps between multi-process checks for a stop signal


@dataclasses.dataclass(frozen=True)
class RunResult:
    step: int  # updates applied in total
    val_loss: float  # nats per token on the validation windows (nan when stopped by a signal)
    run_dir: Path
    stopped_by: int | None = None  # the signal number that stopped the run early, else None

    @property
    def val_ppl(self) -> float:
        return math.exp(self.val_loss)


def compute_dtype(name: str) -> jnp.dtype:
    """`auto` -> bfloat16 on GPU/TPU, float32 on CPU (where bfloat16 matmuls are slower)."""
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    return jnp.dtype(name)


def build_model(config: RunConfig, mesh: Mesh | None = None, key: jax.Array | None = None) -> DeltaNetForCausalLM:
    """The model of `config` with freshly initialised float32 parameters, drawn from `key` (default:
    the key of train.seed); `mesh` (several devices) makes its delta rule run sharded."""
    return DeltaNetForCausalLM(
        config.model,
        rngs=nnx.Rngs(jax.random.key(config.train.seed) if key is None else key),
        dtype=compute_dtype(config.train.dtype),
        param_dtype=jnp.float32,
        implementation=config.train.implementation,
        remat=config.train.remat,
        mesh=mesh,
    )


def optimizer_of(config: RunConfig):
    tc = config.train
    return make_optimizer(
        lr=tc.lr, min_lr=tc.min_lr, warmup_steps=tc.warmup_steps, total_steps=tc.steps,
        weight_decay=tc.weight_decay, grad_clip=tc.grad_clip, b1=tc.b1, b2=tc.b2,
    )


def run_mesh(config: RunConfig) -> Mesh:
    """The mesh of `config` over this run's devices, after the mesh and batch checks (ConfigError)."""
    shape = resolve_mesh_shape(config.mesh, jax.device_count())
    check_mesh_fits(shape, num_devices=jax.device_count(), process_count=jax.process_count())
    check_batch(shape, batch_size=config.train.batch_size, grad_accum=config.train.grad_accum)
    return build_mesh(shape)


class ShardedSetup:
    """Graph definition, abstract state, shardings and the jitted init of a run's TrainState on a mesh."""

    def __init__(self, config: RunConfig, mesh: Mesh):
        self.mesh = mesh
        model_mesh = mesh if mesh.size > 1 else None
        self.tx, self.schedule = optimizer_of(config)
        make = lambda key=None: build_model(config, model_mesh, key)  # noqa: E731
        self._make = make
        self._seed = config.train.seed
        self.graphdef = nnx.split(nnx.eval_shape(make), nnx.Param, ...)[0]
        self.abstract = jax.eval_shape(lambda: init_train_state(make(), self.tx)[1])
        self.shardings = state_shardings(self.abstract, mesh)
        self.batch_sharding = batch_sharding(mesh)

    def init(self) -> TrainState:
        """Fresh state, each array created directly in its sharding.

        The key enters as an argument rather than as a constant seed inside the jitted function,
        where every derived key becomes a compile-time constant of its parameter's random numbers.
        On an H200 the 340M init with a constant seed had not compiled after 8 minutes; with the
        key as an argument it still took about 2 minutes (JAX 0.11.2), nearly all of it compiling the
        unrolled threefry hash of each parameter's random numbers. So on GPU the hash is lowered to
        JAX's threefry kernel for this one compilation: the same numbers (a GPU test checks them bit
        for bit), initialised in about 20 s at 340M and 1.3B on an H200."""
        init = jax.jit(lambda key: init_train_state(self._make(key), self.tx)[1], out_shardings=self.shardings)
        flag = "jax_threefry_gpu_kernel_lowering"
        before = getattr(jax.config, flag)
        jax.config.update(flag, True)
        try:
            return init(jax.random.key(self._seed))
        finally:
            jax.config.update(flag, before)

    def like(self) -> TrainState:
        """ShapeDtypeStructs with this mesh's shardings (the restore target)."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract,
                            self.shardings)

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract.params))


class StopRequest:
    """SIGTERM / SIGINT handlers that ask the loop to save and stop (a second SIGINT interrupts at once)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _restore_data(data: TrainData, data_state: dict[str, Any], out: TextIO) -> None:
    if not data_state:  # a run written from converted weights: start the data from the top
        return
    if "processes" in data_state:
        states = data_state["processes"]
        if len(states) != jax.process_count():
            print(f"warning: the checkpoint's data positions are of {len(states)} processes, this run has "
                  f"{jax.process_count()}: the data order starts afresh", file=out)
            return
        data_state = states[jax.process_index()]
    data.train.set_state(data_state)


def train(
    config: RunConfig, plan: RunDirPlan, *, progress: bool = True, out: TextIO | None = None
) -> RunResult:
    """Train (or continue training) the run planned by `plan_run_dir`; returns the final validation loss.

    Nothing is written before the model is built and any checkpoint to resume from is restored. With
    several processes, every process runs this (each feeding its own batch rows); process 0 writes the
    records. SIGTERM / SIGINT end the run after the current step with a checkpoint (`stopped_by`).
    """
    out = sys.stdout if out is None else out
    lead = jax.process_index() == 0
    tc = config.train
    run_dir = plan.run_dir
    mesh = run_mesh(config)
    setup = ShardedSetup(config, mesh)
    bsh = setup.batch_sharding
    rows = process_rows(bsh, (tc.batch_size, tc.seq_len))
    data = make_train_data(config, rows)
    val_batches = [global_batch(b, bsh, tc.batch_size) for b in data.validation]

    elapsed_before = 0.0
    if plan.resume_step is not None:
        candidates = [s for s in checkpoint_steps(run_dir) if s <= plan.resume_step]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            restored_step, state, data_state, meta = restore_latest(run_dir, candidates, setup.like(),
                                                        keep=config.checkpoint.keep)
        for w in caught:
            print(f"warning: {w.message}", file=out)
        _restore_data(data, data_state, out)
        elapsed_before = float(meta.get("elapsed", 0.0))
        resumed = True
    else:
        state = setup.init()
        restored_step, resumed = None, False
    start = int(state.step)

    # From here on the run directory is written.
    if lead:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir, config.to_dict())
        records = truncate_metrics(run_dir, start)
    else:
        records = []
    checkpointer = RunCheckpointer(run_dir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    writer = MetricsWriter(run_dir) if lead else None
    device = jax.devices()[0]
    dtype = compute_dtype(tc.dtype)
    mesh_text = " x ".join(f"{a}={n}" for a, n in mesh.shape.items())
    if lead:
        what = f"resuming at step {start}" if resumed else "starting"
        print(
            f"{what}: {setup.num_params:,} parameters, {mesh.size} x {device.platform} ({device.device_kind}) "
            f"in {jax.process_count()} process(es), mesh {mesh_text}, compute {jnp.dtype(dtype).name}, "
            f"run dir {run_dir}",
            file=out,
        )
        for change in plan.changed:
            print(f"  changed since the last run: {change}", file=out)
        idle = unused_devices_text(dict(mesh.shape), jax.device_count())
        if idle:
            print(f"  {idle}", file=out)
        if writer.tensorboard_off:
            print(f"warning: {writer.tensorboard_off}", file=out)

    skip = tc.nan_policy == "skip"
    train_step = make_train_step(setup.graphdef, setup.tx, grad_accum=tc.grad_accum, skip_nonfinite=skip,
                                 state_sharding=setup.shardings, batch_sharding=bsh,
                                 compute_sharding=gathered(setup.shardings.params), loss_chunk=tc.loss_chunk)
    eval_step = make_eval_step(setup.graphdef, state_sharding=setup.shardings, batch_sharding=bsh,
                               compute_sharding=gathered(setup.shardings.params), loss_chunk=tc.loss_chunk)
    tokens_per_step = tc.batch_size * tc.seq_len
    flops_per_token = train_flops_per_token(config.model, tc.seq_len)
    peak = peak_flops(device, dtype)
    t0 = time.perf_counter()
    step = start
    saved_step = restored_step
    val_loss = math.nan
    pending: list[tuple[int, dict[str, jax.Array]]] = []  # (step, metrics) since the last record
    skipped_total = 0

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t0

    def check_finite() -> int:
        """Skipped updates among `pending`; with nan_policy=stop, FloatingPointError at the first one."""
        if not pending:
            return 0
        finite = np.asarray(jnp.stack([m["finite"] for _, m in pending]))
        if finite.all():
            return 0
        first = pending[int(np.argmin(finite))]
        if not skip:
            raise FloatingPointError(
                f"non-finite loss or gradient at step {first[0]} (loss {float(first[1]['loss'])}, grad norm "
                f"{float(first[1]['grad_norm'])}); the run stops with "
                + ("no checkpoint saved" if saved_step is None else f"nothing saved past checkpoint {saved_step}")
                + ". "
                "Lower train.lr or raise train.warmup_steps, or set train.nan_policy=skip to skip such updates"
            )
        return int((~finite).sum())

    def save() -> None:
        nonlocal saved_step
        at = int(state.step)
        if saved_step != at:
            check_finite()
            states = gather_json(dict(data.train.get_state()))
            data_state = states[0] if jax.process_count() == 1 else {"processes": states}
            meta = {"elapsed": elapsed(), "seed": tc.seed, "process_count": jax.process_count(), "mesh": mesh_text}
            checkpointer.save(at, state, data_state, meta, config.to_dict())
            saved_step = at

    bar = tqdm(total=tc.steps, initial=start, disable=not (progress and lead), unit="step", dynamic_ncols=True,
               file=sys.stderr)
    interval_start, interval_steps = time.perf_counter(), 0
    stop = StopRequest()
    try:
        with stop:
            while step < tc.steps:
                # Several processes agree on stopping (a collective) only every few steps, so the host
                # keeps running ahead of the devices; one process just reads its flag.
                check_stop = jax.process_count() == 1 or step % STOP_CHECK_EVERY == 0
                if check_stop and any_process(stop.signum is not None):
                    break
                batch = global_batch(next(data), bsh, tc.batch_size)
                state, metrics = train_step(state, batch)
                step += 1
                pending.append((step, metrics))
                interval_steps += 1
                bar.update(1)
                is_eval = step % tc.eval_every == 0 or step == tc.steps
                if step % tc.log_every == 0 or is_eval:
                    skipped = check_finite()
                    skipped_total += skipped
                    losses = np.asarray(jnp.stack([m["loss"] for _, m in pending]), np.float64)
                    ok = np.isfinite(losses)
                    loss = float(losses[ok].mean()) if ok.any() else math.nan
                    seconds = time.perf_counter() - interval_start
                    tokens_per_s = interval_steps * tokens_per_step / seconds
                    record: dict[str, Any] = {
                        "step": step,
                        "loss": loss,
                        "lr": float(setup.schedule(step - 1)),
                        "grad_norm": float(metrics["grad_norm"]),
                        "tokens_per_s": tokens_per_s,
                        "step_time": seconds / interval_steps,
                        "tokens": step * tokens_per_step,
                        "elapsed": elapsed(),
                    }
                    if peak is not None:
                        record["mfu"] = flops_per_token * tokens_per_s / (peak * mesh.size)
                    record.update(device_memory_gib())
                    if skip:
                        record["skipped"] = skipped_total
                        if skipped and lead:
                            bar.write(f"step {step}: skipped {skipped} update(s) with a non-finite loss or gradient "
                                      f"({skipped_total} so far)", file=out)
                    postfix = {"loss": f"{loss:.3f}", "tok/s": f"{tokens_per_s:,.0f}"}
                    if is_eval:
                        val_loss = evaluate(eval_step, state, val_batches)
                        record.update(val_loss=val_loss, val_ppl=math.exp(val_loss), elapsed=elapsed())
                        postfix["val"] = f"{val_loss:.3f}"
                    if lead:
                        writer.write(record)
                        records.append(record)
                        bar.set_postfix(postfix, refresh=False)
                        if is_eval:
                            plot_losses(run_dir, records)
                            plot_throughput(run_dir, records)
                    pending.clear()
                    interval_start, interval_steps = time.perf_counter(), 0
                if config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0:
                    save()
            save()
    except KeyboardInterrupt:  # a second Ctrl-C: leave without a new checkpoint
        bar.close()
        if lead:
            print(f"interrupted: the last checkpoint is of step {saved_step}", file=out)
        raise
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        checkpointer.close()
        data.close()

    if stop.signum is not None and step < tc.steps:
        if lead:
            name = signal.Signals(stop.signum).name
            print(f"{name}: stopped after step {step} with its checkpoint saved; run the same command to resume",
                  file=out)
        return RunResult(step=step, val_loss=math.nan, run_dir=run_dir, stopped_by=stop.signum)
    if math.isnan(val_loss):  # nothing left to train: report the restored model
        val_loss = evaluate(eval_step, state, val_batches)
    if lead:
        plot_losses(run_dir, records)
        plot_throughput(run_dir, records)
        print(f"final val_loss {val_loss:.4f} (ppl {math.exp(val_loss):.2f}) at step {step}", file=out)
    return RunResult(step=step, val_loss=val_loss, run_dir=run_dir)
