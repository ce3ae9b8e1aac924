"""Language-model comparison on the embedded corpus: DeltaNet, its two hybrids, Transformer++ and
linear attention, at (nearly) matched parameter counts and the same token budget.

    python -m experiments.compare [--out DIR] [--quick] [--models a,b,...] [section.field=value ...]

Each model is its byte-level preset from experiments/configs/ (`tiny-shakespeare*.json`; the five
share hidden size, depth, MLP width and training settings and differ only in the token mixers)
trained by `deltanet_jax.train.trainer.train` with the same overrides, hence the same steps, batch,
sequence length, learning rate and seed. Writes to --out: one run directory per model under
`runs/`, `compare.png` (validation loss against training tokens, one curve per model),
`compare.md` and `compare.csv` (parameters, final validation loss and perplexity, training
tokens/s, wall time). Re-running with the same --out resumes (or reuses) finished runs; SIGTERM or
SIGINT stops after the current run's checkpoint, with exit status 128 + the signal number.

Default: sized for one GPU (well under 15 minutes for the five runs). `--quick`: a CPU-sized version.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

MODELS = {
    "deltanet": ("tiny-shakespeare", "DeltaNet"),
    "global-hybrid": ("tiny-shakespeare-global-hybrid", "DeltaNet + global attention (layers 1, 2)"),
    "swa-hybrid": ("tiny-shakespeare-swa-hybrid", "DeltaNet + sliding-window attention (layers 1, 3)"),
    "transformer-pp": ("tiny-shakespeare-transformer-pp", "Transformer++"),
    "linear-attention": ("tiny-shakespeare-linear-attention", "Linear attention"),
}

# The default (one GPU): hidden 256, 4 layers, 256-token windows, 1500 updates of 16 sequences =
# 6.1M training tokens per model (about six passes over the 1M-byte training split).
GPU_OVERRIDES = [
    "model.hidden_size=256", "model.intermediate_size=768", "train.seq_len=256", "train.batch_size=16",
    "train.steps=1500", "train.warmup_steps=100", "train.eval_every=100", "train.eval_batches=16",
    "train.log_every=50", "train.implementation=null", "checkpoint.every_steps=0",
]
# --quick (CPU): hidden 64, 64-byte windows, 150 updates of 8 sequences = 77k tokens per model.
QUICK_OVERRIDES = [
    "model.hidden_size=64", "model.intermediate_size=192", "train.seq_len=64", "train.batch_size=8",
    "train.steps=150", "train.warmup_steps=20", "train.eval_every=25", "train.eval_batches=4",
    "train.log_every=25", "checkpoint.every_steps=0",
]


def build_configs(models: Sequence[str], overrides: Sequence[str]) -> dict[str, Any]:
    """name -> checked RunConfig of each model's preset with `overrides` applied (ConfigError/ValueError)."""
    from deltanet_jax.train.config import RunConfig, apply_overrides
    from experiments.pretrain import load_preset

    configs = {}
    for name in models:
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; expected some of {', '.join(MODELS)}")
        _, raw = load_preset(MODELS[name][0])
        configs[name] = RunConfig.from_dict(apply_overrides(raw, list(overrides)))
    budgets = {(c.train.steps, c.train.batch_size, c.train.seq_len) for c in configs.values()}
    if len(budgets) != 1:  # the presets must agree once the overrides are applied
        raise ValueError(f"the presets disagree on steps / batch / sequence length after overrides: {budgets}")
    return configs


def parameter_count(config) -> int:
    """Trainable parameters of `config.model`, from abstract shapes (nothing allocated)."""
    from flax import nnx

    from deltanet_jax.model import DeltaNetForCausalLM, num_params

    return num_params(nnx.eval_shape(lambda: DeltaNetForCausalLM(config.model, rngs=nnx.Rngs(0))))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def throughput(records: list[dict[str, Any]]) -> float:
    """Median training tokens/s over the logged intervals, leaving out the first (it holds compilation)."""
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    rates = rates[1:] if len(rates) > 1 else rates
    return float(statistics.median(rates)) if rates else math.nan


def run_all(models: Sequence[str], overrides: Sequence[str], out_dir: Path, *, progress: bool = False,
            log=print) -> list[dict[str, Any]]:
    """Train every model (or resume / reuse its run dir under out_dir/runs); write the plot and tables."""
    import jax

    from deltanet_jax.train.run_dir import plan_run_dir
    from deltanet_jax.train.trainer import train

    configs = build_configs(models, overrides)
    plans = {name: plan_run_dir(out_dir / "runs" / name, cfg) for name, cfg in configs.items()}  # checks first
    params = {name: parameter_count(cfg) for name, cfg in configs.items()}
    tc = next(iter(configs.values())).train
    tokens = tc.steps * tc.batch_size * tc.seq_len
    spread = max(params.values()) / min(params.values()) - 1
    device = jax.devices()[0]
    log(f"token budget per model: {tc.steps} updates x {tc.batch_size} sequences x {tc.seq_len} tokens = "
        f"{tokens:,} tokens; lr {tc.lr:g}, seed {tc.seed}; device {device.platform} ({device.device_kind})")
    log("parameters: " + ", ".join(f"{n} {p:,}" for n, p in params.items()) +
        f" (largest {100 * spread:.1f}% above smallest)")
    rows = []
    for name, cfg in configs.items():
        log(f"== {name}: {MODELS[name][1]} (preset {MODELS[name][0]})")
        t0 = time.perf_counter()
        result = train(cfg, plans[name], progress=progress)
        seconds = time.perf_counter() - t0
        if result.stopped_by is not None:  # SIGTERM / SIGINT: the run saved its checkpoint; stop here
            log(f"{signal.Signals(result.stopped_by).name} during {name}: the models after it are not run and no "
                "tables are written; run the same command to resume")
            raise SystemExit(128 + result.stopped_by)
        records = read_metrics(plans[name].run_dir)
        rows.append({
            "model": name, "description": MODELS[name][1], "params": params[name], "tokens": tokens,
            "final_val_loss": result.val_loss, "final_val_ppl": math.exp(result.val_loss),
            "tokens_per_s": throughput(records), "wall_s": seconds,
        })
        log(f"   {name}: val loss {result.val_loss:.4f}, {rows[-1]['tokens_per_s']:,.0f} tokens/s, {seconds:.0f} s")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_tables(out_dir, rows, f"{device.platform} ({device.device_kind})")
    plot_curves(out_dir / "compare.png", {n: read_metrics(p.run_dir) for n, p in plans.items()},
                f"{tokens / 1e6:.2f}M tokens per model, {tc.seq_len}-byte windows")
    log(markdown_table(rows))
    log(f"wrote {out_dir / 'compare.png'}, {out_dir / 'compare.md'}, {out_dir / 'compare.csv'}")
    return rows


FIELDS = ("model", "description", "params", "tokens", "final_val_loss", "final_val_ppl", "tokens_per_s", "wall_s")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | parameters | final val loss | val ppl | train tokens/s | wall s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['description']} | {r['params']:,} | {r['final_val_loss']:.4f} | {r['final_val_ppl']:.2f} "
                     f"| {r['tokens_per_s']:,.0f} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def write_tables(out_dir: Path, rows: list[dict[str, Any]], device: str) -> None:
    with (out_dir / "compare.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    tokens = rows[0]["tokens"] if rows else 0
    (out_dir / "compare.md").write_text(
        f"Same token budget ({tokens:,} tokens) for every model; device {device}. "
        "Wall time includes compilation and validation.\n\n" + markdown_table(rows) + "\n")


def plot_curves(path: Path, metrics: dict[str, list[dict[str, Any]]], subtitle: str) -> None:
    """Validation loss against training tokens, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    for name, records in metrics.items():
        pts = [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r and "tokens" in r]
        if pts:
            ax.plot([p[0] / 1e6 for p in pts], [p[1] for p in pts], marker=".", label=MODELS[name][1])
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation loss (nats / byte)")
    ax.set_title(f"Embedded corpus, {subtitle}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/compare"), help="output folder (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="CPU-sized: " + " ".join(QUICK_OVERRIDES))
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of %(default)s")
    p.add_argument("--progress", action="store_true", help="progress bars")
    p.add_argument("overrides", nargs="*", metavar="section.field=value",
                   help="applied to every model after the default (" + " ".join(GPU_OVERRIDES) + ") or --quick ones")
    return p


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = build_parser()
    args = parser.parse_args(argv)
    from deltanet_jax.train.config import ConfigError
    from deltanet_jax.train.run_dir import RunDirError, plan_run_dir

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    overrides = (QUICK_OVERRIDES if args.quick else GPU_OVERRIDES) + list(args.overrides)
    try:  # every check before any work
        if not models:
            raise ValueError("--models is empty")
        for name, cfg in build_configs(models, overrides).items():
            plan_run_dir(args.out / "runs" / name, cfg)
    except (ConfigError, RunDirError, ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    return run_all(models, overrides, args.out, progress=args.progress, log=lambda m: print(m, flush=True))


if __name__ == "__main__":
    main()
    sys.exit(0)
