"""Multi-query associative recall (MQAR): DeltaNet against attention and linear attention.

    python -m experiments.mqar [--out DIR] [--quick] [--models deltanet,attention,linear] [--dims 64,128,...]
    python -m experiments.mqar --mps   # on a GPU: the worker processes as clients of one MPS server
    python -m experiments.mqar --profile 5 --dims 128,512   # time each cell's update alone, trace 5 more

The DeltaNet paper's setting (from Zoology): vocabulary 8192, sequences of 512 tokens holding 64
key-value pairs, two-layer models with two heads and no short convolution, model dimension in
{64, 128, 256, 512}. Three token mixers share everything else (RMSNorm, the LM head; no MLPs, as
in Zoology's MQAR models, unless `--mlp`): DeltaNet, softmax attention on both layers
(Transformer++) and vanilla linear attention (`mixer="linear"`). Each (model, dimension) cell
trains at its model's learning rate (or sweeps `--lrs` and keeps the best test accuracy: the
fraction of query positions answered right).

The budget is smaller than Zoology's (stated in the output): passes of `--train-examples` training
examples, a new draw every pass so that a model cannot memorise them (`--no-fresh-examples`: one
pool, as Zoology trains), for at most `--max-steps` updates per run, evaluation every
`--eval-every` updates on a separate test set, early stop once test accuracy reaches `--target`
(0.99). A cell that reaches the target skips its remaining learning rates. `--time-limit` is shared out as the runs go: each
run may use an equal share of the time left among the runs still to come. On a GPU the cells train
side by side, one process each (`--workers`), every process with the whole time limit for its
cells: the small models leave most of the GPU idle. Without `--mps` the processes take turns on the
GPU; with it their kernels run at the same time. Writes to --out: `mqar_runs.csv` (every run),
`mqar.csv` (best per cell), `mqar.png` (best accuracy against model dimension per model) and
`mqar_setting.json`.
Training examples come, as in Zoology's MQAR sweeps, from a mix of easier tasks (`--train-mix`,
default 64 tokens with 4 pairs, 128 with 8, 256 with 16 and 32, and the 512-token test task), the
shorter ones packed `seq_len // length` to a row with segment ids that restart the DeltaNet state
and mask attention at each example (`--no-pack-mix` pads each to a row of its own instead);
`--train-mix none` trains on the test task alone.
`--lrs-together` trains a cell's learning rates side by side, their states stacked and updated by
one vmapped step on the same batches (fewer launches; about the same device time as the runs apart).

`--quick` is a CPU-sized version, stated in the output too: 64-token sequences with 8 pairs over 64
tokens, dimensions 16 and 32, one learning rate, 300 updates, and short convolutions on DeltaNet and
linear attention so that recall is learned within a few hundred CPU updates (attention layers have
no short convolution: in --quick, attention is held back by the budget, not by its capacity), and
MLPs (without them DeltaNet at d = 16 learns too slowly for 300 updates).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

MODELS = ("deltanet", "linear", "attention")
MODEL_LABELS = {"deltanet": "DeltaNet", "attention": "Transformer++ (attention)", "linear": "Linear attention"}


# Zoology's MQAR training mix (seq_len, num_kv_pairs, share), the test task last.
ZOOLOGY_MIX = ((64, 4, 0.4), (128, 8, 0.15), (256, 16, 0.15), (256, 32, 0.15), (512, 64, 0.15))


@dataclasses.dataclass(frozen=True)
class Setting:
    """Task, grid and budget of one invocation."""

    vocab_size: int = 8192
    seq_len: int = 512
    num_kv_pairs: int = 64
    power_a: float = 0.01
    num_layers: int = 2
    num_heads: int = 2
    short_conv: bool = False  # the paper's setting has none
    mlp: bool = False  # True: a SwiGLU MLP after each token mixer; False: mixers only, as Zoology's MQAR models
    models: tuple[str, ...] = MODELS
    dims: tuple[int, ...] = (64, 128, 256, 512)
    # None: each model's own learning rate (DEFAULT_LRS); a tuple: these, in order, for every model
    lrs: tuple[float, ...] | None = None
    batch_size: int = 128  # rows of seq_len tokens per update (a packed row holds several examples)
    train_examples: int = 100_000  # per pass over the training data
    # True: a new draw of train_examples every pass (made in the background); False: one fixed pool
    fresh_examples: bool = True
    test_examples: int = 1_024
    max_steps: int = 10_000
    warmup_steps: int = 200
    eval_every: int = 500
    weight_decay: float = 0.1
    target: float = 0.99
    time_limit: float = 540.0  # seconds for the whole grid, shared out among the runs still to come
    seed: int = 0
    implementation: str | None = None  # delta-rule kernel (None: pallas on GPU, chunked elsewhere)
    # Training pool as Zoology trains: (seq_len, num_kv_pairs, share) tasks, shorter ones packed or padded to
    # seq_len rows (pack_mix); () trains on the test task alone. Test examples are always (seq_len, num_kv_pairs).
    train_mix: tuple[tuple[int, int, float], ...] = ZOOLOGY_MIX
    # shorter mix tasks packed seq_len // length examples to a row (segment ids), or padded one to a row
    pack_mix: bool = True
    # (model, dim) cells to train, () for the whole models x dims grid (a worker process's share)
    cells: tuple[tuple[str, int], ...] = ()
    workers: int = 1  # processes training cells at once (one device shared); see run_parallel
    mps: bool = False  # the workers as clients of one CUDA MPS server (experiments.mps)
    lrs_together: bool = False  # a cell's learning rates trained side by side (train_together)

    def lrs_for(self, model: str) -> tuple[float, ...]:
        """The learning rates tried for `model`, in order."""
        return self.lrs if self.lrs is not None else DEFAULT_LRS[model]

    def grid(self) -> list[tuple[str, int]]:
        """The (model, dim) cells trained, in grid order."""
        every = [(m, d) for m in self.models for d in self.dims]
        chosen = set(self.cells)
        return [c for c in every if c in chosen] if chosen else every

    def per_row(self, length: int) -> int:
        """Training examples of a `length`-token task in one row: seq_len // length when packed."""
        return self.seq_len // length if self.pack_mix else 1

    @property
    def label_slots(self) -> int:
        """Labelled positions per row at most (pairs times examples per row): the loss's logits."""
        return max([self.num_kv_pairs] + [pairs * self.per_row(length) for length, pairs, _ in self.train_mix])

    def task(self, seq_len: int | None = None, num_kv_pairs: int | None = None):
        """The MQARConfig of this setting's test task, or of a (seq_len, num_kv_pairs) variant of it."""
        from deltanet_jax.data.synthetic import MQARConfig

        return MQARConfig(vocab_size=self.vocab_size, seq_len=self.seq_len if seq_len is None else seq_len,
                          num_kv_pairs=self.num_kv_pairs if num_kv_pairs is None else num_kv_pairs,
                          power_a=self.power_a)

    def mix_text(self) -> str:
        if not self.train_mix:
            return f"training examples: the test task ({self.seq_len} tokens, {self.num_kv_pairs} pairs)"
        total = sum(w for _, _, w in self.train_mix)
        parts = ", ".join(f"{w / total:.0%} {n} pairs in {length} tokens" for length, n, w in self.train_mix)
        how = (f"shorter ones packed {self.seq_len} // length to a {self.seq_len}-token row, segment ids "
               f"between them" if self.pack_mix else f"each padded to {self.seq_len}")
        return f"training examples: a mix of {parts} ({how})"

    def mix_counts(self) -> list[int]:
        """Training examples of each `train_mix` task (they add up to train_examples)."""
        total = sum(w for _, _, w in self.train_mix)
        counts = [int(self.train_examples * w / total) for _, _, w in self.train_mix]
        counts[0] += self.train_examples - sum(counts)
        return counts

    @property
    def train_rows(self) -> int:
        """Rows of the training pool: one per example, fewer when shorter tasks are packed."""
        if not self.train_mix:
            return self.train_examples
        return sum(-(-n // self.per_row(length)) for (length, _, _), n in zip(self.train_mix, self.mix_counts()))

    def budget_text(self) -> str:
        if self.lrs is not None:
            lrs = ", ".join(f"{lr:g}" for lr in self.lrs)
        else:
            lrs = "; ".join(f"{MODEL_LABELS[m]} {', '.join(f'{lr:g}' for lr in self.lrs_for(m))}" for m in self.models)
        sharing = "sharing the device through one MPS server" if self.mps else "sharing the device"
        where = (f"{self.workers} processes {sharing}, each training its cells" if self.workers > 1
                 else "one process")
        together = ("a cell's learning rates trained side by side, one vmapped update, all stopped once one "
                    "reaches the target" if self.lrs_together else "a cell that reaches the target skips the rest")
        rows = self.train_rows
        per_update = f" (~{self.batch_size * self.train_examples / rows:.0f} examples)" if rows != self.train_examples else ""
        epochs = self.max_steps * self.batch_size / rows
        unit = "rows" if per_update else "sequences"
        passes = (f"{epochs:.1f} passes of {self.train_examples} training examples in {rows} rows, new ones drawn "
                  f"every pass" if self.fresh_examples else
                  f"{epochs:.1f} epochs of one pool of {self.train_examples} training examples in {rows} rows")
        return (f"budget per run: at most {self.max_steps} updates of {self.batch_size} {unit}{per_update} "
                f"({passes}), "
                f"warmup {self.warmup_steps}, "
                f"cosine decay to lr/10, test accuracy on {self.test_used} examples every {self.eval_every} "
                f"updates, early stop at {self.target}; learning rates {lrs} "
                f"({together}); {self.time_limit:.0f} s in {where}, each run "
                f"stopped at its equal share of the time left")

    @property
    def test_used(self) -> int:
        """Test examples evaluated (whole batches)."""
        return self.test_examples // self.batch_size * self.batch_size

    def task_text(self) -> str:
        conv = "short conv on DeltaNet / linear-attention q, k, v" if self.short_conv else "no short conv"
        conv += ", a SwiGLU MLP after each mixer" if self.mlp else ", no MLPs (token mixers only)"
        return (f"MQAR: vocab {self.vocab_size}, seq len {self.seq_len}, {self.num_kv_pairs} key-value pairs, "
                f"power a={self.power_a}; {self.num_layers} layers, {self.num_heads} heads, {conv}")


# Learning rates by model (README "MQAR"): at d = 256 without MLPs, 4 of 4 DeltaNet runs at 2e-3
# left chance by ~1,000 updates and reached 0.99 by 6,000, while 2 of 6 at 3e-3 sat near chance for
# 4,500-8,000 (H100, 2026-12-06); with MLPs, 1e-2 never left chance at d = 128. Attention solved the
# task by 3,000 updates at 1e-3 and sat at chance for 10,000 at 3e-3 (H200, with MLPs).
DEFAULT_LRS = {"deltanet": (2e-3,), "linear": (3e-3,), "attention": (1e-3,)}

QUICK = dict(vocab_size=64, seq_len=64, num_kv_pairs=8, short_conv=True, mlp=True, dims=(16, 32), lrs=(3e-3,),
             train_mix=(), batch_size=32, train_examples=4_000, test_examples=256, max_steps=300, warmup_steps=20,
             eval_every=50, time_limit=1800.0)


def model_config(model: str, dim: int, s: Setting):
    """The DeltaNetConfig of one grid cell."""
    from deltanet_jax.model import DeltaNetConfig

    common = dict(vocab_size=s.vocab_size, hidden_size=dim, num_hidden_layers=s.num_layers, num_heads=s.num_heads,
                  use_short_conv=s.short_conv, use_mlp=s.mlp, max_position_embeddings=max(2048, s.seq_len))
    if model == "deltanet":
        return DeltaNetConfig(**common)
    if model == "linear":
        return DeltaNetConfig(**common, mixer="linear")
    if model == "attention":
        return DeltaNetConfig(**common, attn={"layers": list(range(s.num_layers)), "num_heads": s.num_heads,
                                              "num_kv_heads": s.num_heads})
    raise ValueError(f"unknown model {model!r}; expected one of {', '.join(MODELS)}")


def scaled_optimizer(base, lr: float):
    """`base` (make_optimizer at lr=1, min_lr=0.1) times `lr`, with lr kept in the optimizer state."""
    import optax

    return optax.chain(base, optax.inject_hyperparams(optax.scale)(step_size=lr))


@dataclasses.dataclass
class RunResult:
    model: str
    dim: int
    lr: float
    params: int = 0
    steps: int = 0
    accuracy: float = math.nan
    test_loss: float = math.nan
    seconds: float = 0.0
    status: str = "not run"  # reached target, budget spent, diverged, cut (time limit), skipped (target reached),
    #                          not run (time limit), failed, stopped (another lr reached the target)


class Cell:
    """One (model, dimension): the compiled steps shared by its learning-rate runs."""

    def __init__(self, model: str, dim: int, s: Setting):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from deltanet_jax.model import DeltaNetForCausalLM, num_params
        from deltanet_jax.train.optimizer import make_optimizer
        from deltanet_jax.train.step import init_train_state, labelled_rows, make_eval_step, make_train_step

        self.model, self.dim, self.s = model, dim, s
        self.config = model_config(model, dim, s)
        self.dtype = jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
        # make_optimizer at lr 1 followed by a scale held in the optimizer state: the same update as
        # make_optimizer(lr=lr, min_lr=lr/10), with lr an array, so one compiled step serves every lr.
        base, self.schedule = make_optimizer(lr=1.0, min_lr=0.1, warmup_steps=s.warmup_steps,
                                             total_steps=s.max_steps, weight_decay=s.weight_decay)
        self.tx_for = lambda lr: scaled_optimizer(base, lr)
        self._init_train_state = init_train_state
        self._build = lambda seed: DeltaNetForCausalLM(self.config, rngs=nnx.Rngs(seed), dtype=self.dtype,
                                                       implementation=s.implementation)
        model0 = self._build(s.seed)
        self.params = num_params(model0)
        graphdef, _ = init_train_state(model0, self.tx_for(1.0))
        slots = s.label_slots  # logits only at the query positions: the same loss, 1/4 to 1/8 of the work
        self.train_step = make_train_step(graphdef, self.tx_for(1.0), label_slots=slots)
        self.eval_step = make_eval_step(graphdef, label_slots=slots)

        @jax.jit
        def correct(state, batch):
            model = nnx.merge(graphdef, state.params, state.other)
            targets = batch["targets"]
            h, targets, mask = labelled_rows(model.hidden(batch["inputs"]), targets, targets >= 0, slots)
            hit = (jnp.argmax(model.project(h, model.head_weight()), axis=-1) == targets) & mask
            return hit.sum(), mask.sum()

        self.correct = correct
        self._together = None

    def fresh_state(self, lr: float):
        return self._init_train_state(self._build(self.s.seed), self.tx_for(lr))[1]

    def together(self) -> tuple[Callable, Callable, Callable]:
        """(train step, correct, eval step) over states stacked on a leading axis (one per learning
        rate), the batch shared: `jax.vmap` of the single-state functions, jitted, built once."""
        import jax

        if self._together is None:
            self._together = (jax.jit(jax.vmap(self.train_step, in_axes=(0, None)), donate_argnums=0),
                              jax.jit(jax.vmap(self.correct, in_axes=(0, None))),
                              jax.jit(jax.vmap(self.eval_step, in_axes=(0, None))))
        return self._together


# Seed offset between two draws of the training pool (the test set's seed is s.seed + 10_000).
DRAW_SEED_STRIDE = 1_000_003


def training_pool(s: Setting, draw: int = 0) -> tuple[Any, Any, Any]:
    """(inputs, targets, segment_ids) int32 [rows, seq_len]: the test task's examples (segment_ids
    None), or with `s.train_mix` each listed task's share of `train_examples`, packed
    `s.per_row(length)` to a row (segment ids 1, 2, ... per example, 0 with ignored targets for
    the padding) or padded one to a row. `draw` numbers independent pools of the same setting (one
    per pass over the data with `s.fresh_examples`)."""
    import numpy as np

    from deltanet_jax.data.synthetic import IGNORE_INDEX, multiquery_ar

    seed = s.seed + DRAW_SEED_STRIDE * draw
    if not s.train_mix:
        x, y = multiquery_ar(s.train_examples, s.task(), seed=seed)
        return x, y, None
    rows = s.train_rows
    inputs = np.zeros((rows, s.seq_len), np.int32)
    targets = np.full((rows, s.seq_len), IGNORE_INDEX, np.int32)
    segments = np.zeros((rows, s.seq_len), np.int32)
    row = 0
    for i, ((length, pairs, _), n) in enumerate(zip(s.train_mix, s.mix_counts())):
        if n == 0:
            continue
        x, y = multiquery_ar(n, s.task(length, pairs), seed=seed + 101 * i)
        k = s.per_row(length)
        used = -(-n // k)
        for j in range(k):  # example e goes to row e // k, slot e % k
            part = slice(j, n, k)
            m = len(x[part])
            cols = slice(j * length, (j + 1) * length)
            inputs[row:row + m, cols], targets[row:row + m, cols] = x[part], y[part]
            segments[row:row + m, cols] = j + 1
        row += used
    return inputs, targets, segments


def _batches(pool: tuple[Any, Any, Any], batch_size: int, seed: int,
             refill: Callable[[int], tuple[Any, Any, Any]] | None = None):
    """Endless shuffled batches {inputs, targets[, segment_ids]} over a pool of rows, a new
    permutation per pass. Without `refill` every pass visits the same pool; with it pass e > 0
    visits `refill(e)`, drawn in a background thread while pass e - 1 is trained on."""
    import threading

    import numpy as np

    rng = np.random.default_rng(seed)

    def start(draw: int) -> Callable[[], tuple[Any, Any, Any]]:
        box: dict[str, Any] = {}

        def work():
            try:
                box["pool"] = refill(draw)
            except BaseException as err:  # re-raised in the training loop
                box["error"] = err

        thread = threading.Thread(target=work, name=f"mqar-draw-{draw}", daemon=True)
        thread.start()

        def result():
            thread.join()
            if "error" in box:
                raise box["error"]
            return box["pool"]
        return result

    draw = 0
    while True:
        upcoming = start(draw + 1) if refill is not None else None
        inputs, targets, segments = pool
        n = len(inputs)
        order = rng.permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = order[i:i + batch_size]
            batch = {"inputs": inputs[idx], "targets": targets[idx]}
            if segments is not None:
                batch["segment_ids"] = segments[idx]
            yield batch
        if upcoming is not None:
            pool, draw = upcoming(), draw + 1


def training_batches(s: Setting, pool: tuple[Any, Any, Any]):
    """A run's batches (`_batches`): over `pool` (`training_pool(s)`) and, with `s.fresh_examples`,
    a new draw of it every pass; the same sequence for every run of `s`."""
    refill = functools.partial(training_pool, s) if s.fresh_examples else None
    return _batches(pool, s.batch_size, seed=s.seed + 1, refill=refill)


def _evaluate(correct: Callable, eval_step: Callable, state, test_batches) -> tuple[Any, Any]:
    """(accuracy over query positions, mean loss over query positions) on the test set, float64:
    scalars for one state (`Cell.correct`, `Cell.eval_step`), `[R]` for stacked ones (`Cell.together`)."""
    import numpy as np

    hits = total = loss = 0.0
    for batch in test_batches:
        h, n = correct(state, batch)
        l_sum, _ = eval_step(state, batch)
        hits = hits + np.asarray(h, np.float64)
        total = total + np.asarray(n, np.float64)
        loss = loss + np.asarray(l_sum, np.float64)
    return hits / np.maximum(total, 1.0), loss / np.maximum(total, 1.0)


def train_run(cell: Cell, lr: float, train, test_batches, log: Callable[[str], None],
              deadline: float = math.inf) -> RunResult:
    """Train one learning rate of `cell` until the target accuracy, the step budget or `deadline`
    (a time.perf_counter() value; the run is then evaluated once more and marked as cut)."""
    s = cell.s
    result = RunResult(cell.model, cell.dim, lr, params=cell.params)
    t0 = time.perf_counter()
    state = cell.fresh_state(lr)
    data = training_batches(s, train)
    tag = f"[{cell.model} d={cell.dim} lr={lr:g}]"
    step = 0
    result.status = "budget spent"
    # Updates since the last evaluation, timed without it (the first interval includes compilation).
    mark, mark_step = time.perf_counter(), 0
    while step < s.max_steps:
        state, metrics = cell.train_step(state, next(data))
        step += 1
        cut = time.perf_counter() > deadline
        if step % s.eval_every == 0 or step == s.max_steps or cut:
            train_loss = float(metrics["loss"])
            step_ms = (time.perf_counter() - mark) / (step - mark_step) * 1e3
            if not math.isfinite(train_loss):
                result.status = "diverged"
                log(f"{tag} step {step}: training loss {train_loss}, stopped")
                break
            acc, test_loss = _evaluate(cell.correct, cell.eval_step, state, test_batches)
            result.steps, result.accuracy, result.test_loss = step, float(acc), float(test_loss)
            log(f"{tag} step {step:5d}  train loss {train_loss:.3f}  test loss {test_loss:.3f}  "
                f"acc {acc:.3f}  ({time.perf_counter() - t0:.1f} s, {step_ms:.1f} ms per update)")
            mark, mark_step = time.perf_counter(), step
            if acc >= s.target:
                result.status = "reached target"
                break
            if cut:
                result.status = "cut (time limit)"
                break
    result.steps = max(result.steps, step)
    result.seconds = time.perf_counter() - t0
    return result


def train_together(cell: Cell, lrs: Sequence[float], train, test_batches, log: Callable[[str], None],
                   deadline: float = math.inf) -> list[RunResult]:
    """Train the learning rates `lrs` of `cell` side by side: their states stacked on a leading axis,
    updated by one vmapped step on the batches a separate `train_run` of each would see (same
    initial weights, same order): one launch sequence for the whole sweep. All stop together: once
    one reaches the target (the others marked "stopped (another lr reached the target)"), at the
    step budget, or at `deadline` (evaluated once more, marked cut). A learning rate whose training
    loss turns non-finite is marked diverged and keeps its last finite evaluation. Returns one
    RunResult per learning rate, in order."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    s = cell.s
    step_fn, correct_fn, eval_fn = cell.together()
    results = [RunResult(cell.model, cell.dim, lr, params=cell.params, status="budget spent") for lr in lrs]
    t0 = time.perf_counter()
    state = jax.tree.map(lambda *xs: jnp.stack(xs), *[cell.fresh_state(lr) for lr in lrs])
    data = training_batches(s, train)
    tag = f"[{cell.model} d={cell.dim} lr={'/'.join(f'{lr:g}' for lr in lrs)}]"
    live = np.ones(len(lrs), bool)
    show = lambda xs: "/".join(f"{x:.3f}" for x in xs)  # noqa: E731
    step = 0
    mark, mark_step = time.perf_counter(), 0
    while step < s.max_steps:
        state, metrics = step_fn(state, next(data))
        step += 1
        cut = time.perf_counter() > deadline
        if step % s.eval_every == 0 or step == s.max_steps or cut:
            train_loss = np.asarray(metrics["loss"], np.float64)
            step_ms = (time.perf_counter() - mark) / (step - mark_step) * 1e3
            acc, test_loss = _evaluate(correct_fn, eval_fn, state, test_batches)
            for i, r in enumerate(results):
                if live[i] and not math.isfinite(train_loss[i]):
                    live[i], r.status, r.steps = False, "diverged", step
                    log(f"{tag} step {step}: training loss {train_loss[i]} at lr {r.lr:g}, diverged")
                elif live[i]:
                    r.steps, r.accuracy, r.test_loss = step, float(acc[i]), float(test_loss[i])
            log(f"{tag} step {step:5d}  train loss {show(train_loss)}  test loss {show(test_loss)}  "
                f"acc {show(acc)}  ({time.perf_counter() - t0:.1f} s, {step_ms:.1f} ms per update)")
            mark, mark_step = time.perf_counter(), step
            reached = {i for i, r in enumerate(results) if live[i] and r.accuracy >= s.target}
            if reached or cut or not live.any():
                for i, r in enumerate(results):
                    if live[i] and reached:
                        r.status = "reached target" if i in reached else "stopped (another lr reached the target)"
                    elif live[i] and cut:
                        r.status = "cut (time limit)"
                break
    seconds = time.perf_counter() - t0
    for i, r in enumerate(results):
        r.steps = r.steps if not live[i] else max(r.steps, step)
        r.seconds = seconds
    return results


def schedule(s: Setting) -> list[tuple[str, int, float]]:
    """Every run (model, dim, lr) in training order: first learning rates of all cells, then second
    ones, and so on."""
    cells = s.grid()
    passes = max(len(s.lrs_for(m)) for m, _ in cells)
    return [(m, d, s.lrs_for(m)[i]) for i in range(passes) for m, d in cells if i < len(s.lrs_for(m))]


def _runs_left(order: list[tuple[str, int, float]], position: int, solved: set) -> int:
    """Runs of `order` from `position` on, those of the cells in `solved` left out."""
    return sum((m, d) not in solved for m, d, _ in order[position:])


def _check_grid(s: Setting) -> None:
    """Refuse bad models / dims before any work."""
    for m in s.models:
        model_config(m, s.dims[0], s)
    for d in s.dims:
        model_config(s.models[0], d, s)


def _device_text() -> str:
    import jax

    device = jax.devices()[0]
    return f"{device.platform} ({device.device_kind})"


def _log_header(s: Setting, log: Callable[[str], None], device: str) -> None:
    log(f"{s.task_text()}")
    log(f"{s.mix_text()}")
    log(f"{s.budget_text()}")
    log(f"device: {device}")


def run_grid(s: Setting, out_dir: Path, log: Callable[[str], None] = print, header: bool = True) -> list[RunResult]:
    """Train the cells of `s` in this process; write the CSVs, the plot and the setting; return every run."""
    from deltanet_jax.data.synthetic import multiquery_ar

    task = s.task()
    _check_grid(s)
    out_dir.mkdir(parents=True, exist_ok=True)
    device_text = _device_text()
    if header:
        _log_header(s, log, device_text)
    t_start = time.perf_counter()
    train = training_pool(s)
    test_inputs, test_targets = multiquery_ar(s.test_examples, task, seed=s.seed + 10_000)
    test_batches = [{"inputs": test_inputs[i:i + s.batch_size], "targets": test_targets[i:i + s.batch_size]}
                    for i in range(0, s.test_examples - s.batch_size + 1, s.batch_size)]
    if not test_batches:
        raise ValueError(f"test_examples={s.test_examples} must be at least batch_size={s.batch_size}")
    if header:
        log(f"data: {s.train_examples} training examples in {s.train_rows} rows and {s.test_used} test examples "
            f"generated in {time.perf_counter() - t_start:.1f} s")

    order = schedule(s)
    results = {run: RunResult(*run) for run in order}
    if s.lrs_together:  # one run per cell, its learning rates side by side
        grid = s.grid()
        for position, (m, d) in enumerate(grid):
            now = time.perf_counter()
            if now - t_start > s.time_limit:
                for lr in s.lrs_for(m):
                    results[(m, d, lr)].status = "not run (time limit)"
                continue
            share = (t_start + s.time_limit - now) / (len(grid) - position)
            cell = Cell(m, d, s)
            log(f"[{m} d={d}] {cell.params:,} parameters (built in {time.perf_counter() - now:.1f} s)")
            for r in train_together(cell, s.lrs_for(m), train, test_batches, log, deadline=now + share):
                results[(m, d, r.lr)] = r
        order = []
    cells: dict[tuple[str, int], Cell] = {}
    solved: set[tuple[str, int]] = set()
    for position, (m, d, lr) in enumerate(order):  # one learning rate at a time over all cells
        r = results[(m, d, lr)]
        if (m, d) in solved:
            r.status = "skipped (target reached)"
            cells.pop((m, d), None)  # free a solved cell's compiled steps
            continue
        now = time.perf_counter()
        if now - t_start > s.time_limit:
            r.status = "not run (time limit)"
            continue
        # this run's share of the time left: the runs still to come share it equally, and time a
        # run leaves unused (early stop, a solved cell's skipped runs) passes on
        share = (t_start + s.time_limit - now) / _runs_left(order, position, solved)
        if (m, d) not in cells:
            cells[(m, d)] = Cell(m, d, s)
            log(f"[{m} d={d}] {cells[(m, d)].params:,} parameters (built in {time.perf_counter() - now:.1f} s)")
        r = train_run(cells[(m, d)], lr, train, test_batches, log, deadline=now + share)
        r.params = cells[(m, d)].params
        results[(m, d, lr)] = r
        if r.status == "reached target":
            solved.add((m, d))
    runs = list(results.values())
    for r in runs:
        if not r.params:
            r.params = _param_count(r.model, r.dim, s)
    _finish(s, out_dir, runs, time.perf_counter() - t_start, device_text, log, table=header)
    return runs


def _finish(s: Setting, out_dir: Path, runs: list[RunResult], seconds: float, device: str,
            log: Callable[[str], None], table: bool = True) -> None:
    best = best_per_cell(runs, s)
    write_outputs(out_dir, s, runs, best, seconds, device)
    if table:
        log(f"total {seconds:.0f} s")
        log(format_table(best, s))
        log(f"wrote {out_dir / 'mqar.csv'}, {out_dir / 'mqar_runs.csv'}, {out_dir / 'mqar.png'}")


def _setting_json(s: Setting) -> str:
    return json.dumps(dataclasses.asdict(s))


def setting_from_json(text: str) -> Setting:
    """The Setting `_setting_json` wrote (lists back to tuples)."""
    raw = json.loads(text)
    tup = lambda x: tuple(tup(v) for v in x) if isinstance(x, list) else x  # noqa: E731
    return Setting(**{k: tup(v) for k, v in raw.items()})


def read_runs(path: Path) -> list[RunResult]:
    """The runs of an `mqar_runs.csv`."""
    with path.open(newline="") as f:
        return [RunResult(model=row["model"], dim=int(row["dim"]), lr=float(row["lr"]), params=int(row["params"]),
                          steps=int(row["steps"]), accuracy=float(row["accuracy"]), test_loss=float(row["test_loss"]),
                          seconds=float(row["seconds"]), status=row["status"]) for row in csv.DictReader(f)]


def run_parallel(s: Setting, out_dir: Path, log: Callable[[str], None] = print) -> list[RunResult]:
    """Train the grid in `s.workers` processes at once, each with the whole time limit for its share
    of the cells (dealt round-robin, so every process gets a mix of models and sizes), then merge
    their runs into one set of outputs. Small models leave most of a GPU idle, so running cells side
    by side gives each of them more updates in the same time."""
    import subprocess

    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the processes share one device
    _check_grid(s)
    cells = s.grid()
    workers = min(s.workers, len(cells))
    groups = [cells[i::workers] for i in range(workers)]
    out_dir.mkdir(parents=True, exist_ok=True)
    device_text = _device_text()
    _log_header(dataclasses.replace(s, workers=workers), log, device_text)
    t_start = time.perf_counter()
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    procs = []
    for i, group in enumerate(groups):
        sub = dataclasses.replace(s, cells=tuple(group), workers=1)
        cmd = [sys.executable, "-m", "experiments.mqar", "--worker-setting", _setting_json(sub),
               "--out", str(out_dir / "workers" / f"{i}")]
        log(f"process {i}: " + ", ".join(f"{m} d={d}" for m, d in group))
        procs.append(subprocess.Popen(cmd, env=env))
    failed = [(i, rc) for i, p in enumerate(procs) if (rc := p.wait()) != 0]
    runs = []
    for i, group in enumerate(groups):
        path = out_dir / "workers" / f"{i}" / "mqar_runs.csv"
        if path.is_file():
            runs += read_runs(path)
        else:
            runs += [RunResult(m, d, lr, params=_param_count(m, d, s), status="failed")
                     for m, d, lr in schedule(dataclasses.replace(s, cells=tuple(group)))]
    by_key = {(r.model, r.dim, r.lr): r for r in runs}
    runs = [by_key[run] for run in schedule(s) if run in by_key]
    _finish(s, out_dir, runs, time.perf_counter() - t_start, device_text, log)
    if failed:
        raise RuntimeError("MQAR worker processes failed (process, exit status): "
                           + ", ".join(f"{i}: {rc}" for i, rc in failed) + "; their cells are marked failed")
    return runs


def profile_cells(s: Setting, steps: int, log: Callable[[str], None] = print, timed: int = 50) -> list[dict[str, Any]]:
    """Time one update of each grid cell alone (no training run): the median ms of `timed` updates
    with a barrier after each (fed from host memory, as `train_run` feeds it) and the mean of
    `timed` back to back, then the device kernels of `steps` more updates by kind and the slowest
    ones (GPU traces only)."""
    import jax

    from experiments.bench_train import print_profile, profile_jax_steps
    from experiments.timing import median_ms, pipelined_ms

    examples_per_row = s.train_examples / s.train_rows  # > 1 with packing
    pool = training_pool(dataclasses.replace(
        s, train_examples=max(math.ceil(8 * s.batch_size * examples_per_row), 256)))
    rows = []
    for m, d in s.grid():
        t0 = time.perf_counter()
        cell = Cell(m, d, s)
        data = _batches(pool, s.batch_size, seed=s.seed + 1)
        fixed = jax.device_put(next(data))
        holder = {"state": cell.fresh_state(s.lrs_for(m)[0])}

        def update(batch=None):
            holder["state"], metrics = cell.train_step(holder["state"], fixed if batch is None else batch)
            return metrics

        for _ in range(10):
            jax.block_until_ready(update(next(data)))
        compile_s = time.perf_counter() - t0
        barrier_ms = median_ms(lambda: update(next(data)), reps=timed, warmup=0)
        back_to_back_ms = pipelined_ms(update, sync=lambda m: jax.block_until_ready((holder["state"], m)),
                                       calls=timed, reps=1, warmup=0)
        log(f"[{m} d={d}] {cell.params:,} parameters; compiled and 10 updates in {compile_s:.1f} s; "
            f"{barrier_ms:.2f} ms per update with a barrier each, {back_to_back_ms:.2f} back to back")
        row = {"model": m, "dim": d, "params": cell.params, "barrier_ms": barrier_ms,
               "back_to_back_ms": back_to_back_ms, "profile": None}
        if steps:
            row["profile"] = profile_jax_steps(lambda: jax.block_until_ready(update()), steps)
            print_profile(f"[{m} d={d}]", dict(row["profile"], top=row["profile"]["top"][:12]))
        rows.append(row)
    return rows


def _param_count(model: str, dim: int, s: Setting) -> int:
    from flax import nnx

    from deltanet_jax.model import DeltaNetForCausalLM, num_params

    return num_params(nnx.eval_shape(lambda: DeltaNetForCausalLM(model_config(model, dim, s), rngs=nnx.Rngs(0))))


def best_per_cell(runs: list[RunResult], s: Setting) -> list[RunResult]:
    """The run with the highest accuracy of each (model, dim), in grid order (NaN when none ran)."""
    best = []
    for m, d in s.grid():
        cell = [r for r in runs if r.model == m and r.dim == d and math.isfinite(r.accuracy)]
        if cell:
            best.append(max(cell, key=lambda r: (r.accuracy, -r.steps)))
        else:
            best.append(next(r for r in runs if r.model == m and r.dim == d))
    return best


FIELDS = ("model", "dim", "lr", "params", "steps", "accuracy", "test_loss", "seconds", "status")


def _write_csv(path: Path, rows: list[RunResult]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            row = dataclasses.asdict(r)
            row["accuracy"] = f"{r.accuracy:.4f}"
            row["test_loss"] = f"{r.test_loss:.4f}"
            row["seconds"] = f"{r.seconds:.1f}"
            w.writerow(row)


def write_outputs(out_dir: Path, s: Setting, runs: list[RunResult], best: list[RunResult], seconds: float,
                  device: str) -> None:
    _write_csv(out_dir / "mqar_runs.csv", runs)
    _write_csv(out_dir / "mqar.csv", best)
    setting = dataclasses.asdict(s) | {"task": s.task_text(), "training": s.mix_text(), "budget": s.budget_text(),
                                       "device": device,
                                       "total_seconds": round(seconds, 1)}
    (out_dir / "mqar_setting.json").write_text(json.dumps(setting, indent=2) + "\n")
    plot(out_dir / "mqar.png", s, best)


def plot(path: Path, s: Setting, best: list[RunResult]) -> None:
    """Best test accuracy against model dimension, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    markers = {"deltanet": "o", "linear": "^", "attention": "s"}
    for m in s.models:
        pts = [(r.dim, r.accuracy) for r in best if r.model == m]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers.get(m, "o"), label=MODEL_LABELS.get(m, m))
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(s.dims))
    ax.set_xticklabels([str(d) for d in s.dims])
    ax.set_ylim(-0.02, 1.02)
    ax.axhline(s.target, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("model dimension")
    ax.set_ylabel("MQAR accuracy (best learning rate)")
    conv = (", short conv on DeltaNet / linear" if s.short_conv else "") + (", MLPs" if s.mlp else ", no MLPs")
    ax.set_title(f"MQAR, seq len {s.seq_len}, {s.num_kv_pairs} key-value pairs, vocab {s.vocab_size}{conv}",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(best: list[RunResult], s: Setting) -> str:
    """Best accuracy per cell as a markdown table (models as rows, dims as columns)."""
    lines = ["| model | " + " | ".join(f"d={d}" for d in s.dims) + " |",
             "|---|" + "---|" * len(s.dims)]
    for m in s.models:
        cells = [r for r in best if r.model == m]
        lines.append(f"| {MODEL_LABELS.get(m, m)} | " + " | ".join(
            "—" if not math.isfinite(r.accuracy) else f"{r.accuracy:.3f}" for r in cells) + " |")
    return "\n".join(lines)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _mix(text: str) -> tuple[tuple[int, int, float], ...]:
    if text.strip().lower() == "none":
        return ()
    try:
        parts = [x.split(":") for x in text.split(",") if x.strip()]
        mix = tuple((int(a), int(b), float(c)) for a, b, c in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated seq_len:pairs:share triples (e.g. 64:4:0.5,512:64:0.5) or none, got {text!r}"
        ) from None
    if not mix or any(w <= 0 for _, _, w in mix):
        raise argparse.ArgumentTypeError(f"every share must be positive, got {text!r}")
    return mix


def _models(text: str) -> tuple[str, ...]:
    values = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [v for v in values if v not in MODELS]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"models must be among {', '.join(MODELS)}, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.mqar", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/mqar"), help="output folder (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="CPU-sized setting: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    p.add_argument("--models", type=_models, help=f"comma-separated subset of {', '.join(MODELS)} (default all)")
    p.add_argument("--dims", type=_int_list, help="model dimensions (default 64,128,256,512)")
    p.add_argument("--lrs", type=_float_list, help="learning rates in the order tried, for every model, e.g. "
                   "2e-3,3e-3 (default: 2e-3 for DeltaNet, 3e-3 for linear attention, 1e-3 for attention)")
    defaults = Setting()
    for name, kind in (("vocab-size", int), ("seq-len", int), ("num-kv-pairs", int), ("batch-size", int),
                       ("train-examples", int), ("test-examples", int), ("max-steps", int), ("warmup-steps", int),
                       ("eval-every", int), ("seed", int), ("target", float), ("time-limit", float),
                       ("power-a", float), ("weight-decay", float)):
        p.add_argument(f"--{name}", type=kind, help=f"default {getattr(defaults, name.replace('-', '_'))}")
    p.add_argument("--train-mix", type=_mix,
                   help="training tasks as seq_len:pairs:share triples, e.g. 64:4:0.4,512:64:0.6 (shorter ones "
                        "packed or padded to --seq-len rows), or none for the test task alone (default, Zoology's: "
                        + (",".join(f"{a}:{b}:{c:g}" for a, b, c in defaults.train_mix) or "none") + ")")
    p.add_argument("--pack-mix", action=argparse.BooleanOptionalAction, default=None,
                   help="pack shorter --train-mix tasks seq_len // length examples to a row, segment ids between "
                        "them (default); --no-pack-mix pads each example to a row of its own")
    p.add_argument("--fresh-examples", action=argparse.BooleanOptionalAction, default=None,
                   help="draw new training examples every pass over --train-examples (default; the next draw "
                        "is made in the background); --no-fresh-examples trains on one fixed pool")
    p.add_argument("--short-conv", action="store_const", const=True,
                   help="give DeltaNet and linear attention their short convolutions (the paper's setting has none)")
    p.add_argument("--mlp", action=argparse.BooleanOptionalAction, default=None,
                   help="a SwiGLU MLP after each token mixer; --no-mlp (default): token mixers only, as in "
                        "Zoology's MQAR models")
    p.add_argument("--lrs-together", action="store_const", const=True,
                   help="train each cell's learning rates side by side in one vmapped update (one run per "
                        "cell, stopped once one reaches the target) instead of one after another")
    p.add_argument("--implementation", choices=("chunked", "recurrent", "pallas"),
                   help="delta-rule kernel (default: pallas on GPU, chunked elsewhere)")
    p.add_argument("--workers", type=int, help="processes training cells at once, sharing the device (default: "
                                               "one per cell on a GPU, 1 elsewhere)")
    p.add_argument("--mps", action="store_const", const=True,
                   help="run the worker processes as clients of a CUDA MPS server started for the grid and "
                        "stopped after it (nvidia-cuda-mps-control on PATH), so that their kernels share the "
                        "GPU's SMs at once instead of taking turns")
    p.add_argument("--profile", type=int, metavar="STEPS",
                   help="train nothing: time one update of each selected cell alone, then trace STEPS more "
                        "(device kernels by kind, on a GPU); writes mqar_profile.json to --out")
    p.add_argument("--worker-setting", help=argparse.SUPPRESS)  # a worker process's Setting, as JSON
    return p


def setting_from_args(args: argparse.Namespace) -> Setting:
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    for field in dataclasses.fields(Setting):
        given = getattr(args, field.name, None)
        if given is not None:
            values[field.name] = given
    s = Setting(**values)
    for name in ("batch_size", "train_examples", "test_examples", "max_steps", "eval_every", "num_layers",
                 "num_heads"):
        if getattr(s, name) < 1:
            raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")
    if s.warmup_steps < 0 or s.seed < 0 or s.weight_decay < 0:
        raise ValueError("warmup-steps, seed and weight-decay must be >= 0")
    s.task()
    for length, pairs, _ in s.train_mix:  # before train_rows, which divides seq_len by each length
        if length > s.seq_len:
            raise ValueError(f"train-mix sequence length {length} is longer than seq-len {s.seq_len} (give a "
                             f"--train-mix that fits, or --train-mix none)")
        s.task(length, pairs)
    if s.train_rows < s.batch_size or s.test_examples < s.batch_size:
        raise ValueError(f"the training rows ({s.train_rows} from train-examples {s.train_examples}) and "
                         f"test-examples ({s.test_examples}) must be at least batch-size ({s.batch_size})")
    if s.workers < 1:
        raise ValueError(f"workers must be >= 1, got {s.workers}")
    if not 0 < s.target <= 1:
        raise ValueError(f"target must be in (0, 1], got {s.target}")
    for m in s.models:
        for d in s.dims:
            model_config(m, d, s)
    return s


def main(argv: Sequence[str] | None = None) -> list[Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    if args.worker_setting:
        return run_grid(setting_from_json(args.worker_setting), args.out, log=log, header=False)
    try:
        s = setting_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    if args.quick:
        print("--quick: a CPU-sized version of the paper's setting (values below)")
    if args.profile is not None and args.profile < 0:
        parser.error(f"--profile must be >= 0, got {args.profile}")
    if s.mps:
        from experiments.mps import CONTROL, control_path, mps_server

        if args.profile is not None:
            parser.error("--mps shares the GPU among the grid's worker processes; --profile times each cell alone")
        if args.workers == 1:
            parser.error("--mps shares the GPU among worker processes; --workers 1 starts none")
        if control_path() is None:
            parser.error(f"--mps needs {CONTROL} on PATH (it comes with the NVIDIA driver); it was not found")
        with mps_server(log=log):  # before this process starts CUDA, so that it is a client too
            return _run(args, s, log)
    return _run(args, s, log)


def _run(args: argparse.Namespace, s: Setting, log: Callable[[str], None]) -> list[Any]:
    if args.profile is not None:
        rows = profile_cells(s, args.profile, log=log)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "mqar_profile.json").write_text(json.dumps(rows, indent=2) + "\n")
        log(f"wrote {args.out / 'mqar_profile.json'}")
        return rows
    if args.workers is None:
        # asking for the backend starts it: without preallocation, so the workers find the memory free
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        import jax

        s = dataclasses.replace(s, workers=len(s.grid()) if jax.default_backend() == "gpu" else 1)
    if s.workers > 1:
        return run_parallel(s, args.out, log=log)
    return run_grid(s, args.out, log=log)


if __name__ == "__main__":
    main()
    sys.exit(0)
