"""Evaluate a run: validation loss, bits per byte, perplexity and a length-extrapolation report.

    python -m experiments.evaluate --run-dir DIR [--data CORPUS_FILE_OR_DATASET] [--seq-len N] [--batches N]
        [--batch-size N] [--extrapolation F] [--step N] [--tokenizer SPEC] [--out DIR]
    python -m experiments.evaluate --run-dir DIR --tasks piqa,hellaswag [--limit N]   (needs the `eval` extra)

The data default to the run's own `data` section (its corpus' validation split, or the validation
split of its prepared dataset). The length report scores windows of F x train.seq_len tokens
(F = 4 by default) and gives the loss by position bucket (half a training length wide), as a table,
a plot (length_extrapolation.png) and, with the other figures, evaluation.json in --out (default:
the run directory).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

RESULTS_FILE = "evaluation.json"
PLOT_FILE = "length_extrapolation.png"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, required=True, help="run directory (config.json + checkpoints/)")
    p.add_argument("--data", default=None,
                   help="embedded corpus name, UTF-8 text file (its last 10%% is the validation split) or a "
                        "directory written by experiments.prepare_data (default: the run's data section)")
    p.add_argument("--tokenizer", default=None, help="'byte' or a tokenizer.json (default: the run's data.tokenizer)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per validation window (default: train.seq_len)")
    p.add_argument("--batches", type=int, default=None, help="validation batches (default: train.eval_batches)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per batch (default: %(default)s)")
    p.add_argument("--extrapolation", type=int, default=4,
                   help="length report up to this many training lengths; 0 = no report (default: %(default)s)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--out", type=Path, default=None, help=f"where {RESULTS_FILE} and {PLOT_FILE} go (default: run dir)")
    p.add_argument("--tasks", default=None, help="comma-separated lm-evaluation-harness tasks (zero-shot)")
    p.add_argument("--limit", type=int, default=None, help="lm-eval: examples per task (default: all)")
    p.add_argument("--include-path", default=None, help="lm-eval: folder of extra task YAML files")
    return p


def check_args(args: argparse.Namespace) -> None:
    if not args.run_dir.is_dir():
        raise ValueError(f"--run-dir {args.run_dir} is not a directory")
    for name in ("seq_len", "batches", "batch_size", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.extrapolation < 0:
        raise ValueError(f"--extrapolation must be >= 0, got {args.extrapolation}")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} exists and is not a directory")


def data_config(config: Any, data: str | None, tokenizer: str | None, run_dir: Path) -> Any:
    """The run's DataConfig with --data / --tokenizer applied (no workers or prefetching)."""
    dc = dataclasses.replace(config.data, workers=0, prefetch_threads=0)
    if data is not None:
        if Path(data).expanduser().is_dir():
            dc = dataclasses.replace(dc, path=data)
        else:
            dc = dataclasses.replace(dc, corpus=data, path="")
    if tokenizer is not None:
        dc = dataclasses.replace(dc, tokenizer=tokenizer)
    elif dc.tokenizer != "byte" and not Path(dc.tokenizer).expanduser().exists() \
            and (run_dir / "tokenizer.json").is_file():
        dc = dataclasses.replace(dc, tokenizer=str(run_dir / "tokenizer.json"))
    return dc


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=True) + "\n")
    os.replace(tmp, path)


def format_buckets(buckets: list[dict[str, Any]], train_len: int) -> str:
    ref = [b["loss"] for b in buckets if b["end"] <= train_len and b["tokens"]]
    base = ref[-1] if ref else float("nan")
    lines = [f"{'positions':>15}  {'loss':>8}  {'vs last trained':>15}  {'tokens':>8}"]
    for b in buckets:
        mark = " " if b["end"] <= train_len else "*"
        lines.append(f"{b['start']:>7}-{b['end'] - 1:<6}{mark}  {b['loss']:8.4f}  {b['loss'] - base:+15.4f}  "
                     f"{b['tokens']:>8}")
    lines.append(f"(* beyond the training length {train_len})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        from deltanet_jax.data.build import build_data, check_data
        from deltanet_jax.train.saved_model import load_model, read_run_config

        config = read_run_config(args.run_dir)
        dc = data_config(config, args.data, args.tokenizer, args.run_dir)
        tokenizer = check_data(dc, vocab_size=config.model.vocab_size)
        manager = None
        if args.tasks is not None:
            from deltanet_jax.lm_eval_adapter import check_tasks_available, task_manager

            check_tasks_available()
            tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
            manager = task_manager(tasks, args.include_path)
        loaded = load_model(args.run_dir, step=args.step)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    out_dir = args.out if args.out is not None else args.run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"run_dir": str(args.run_dir), "step": loaded.step}
    if args.tasks is not None:
        from deltanet_jax.lm_eval_adapter import evaluate_tasks

        scores = evaluate_tasks(loaded.model, tokenizer, tasks, limit=args.limit, manager=manager)
        for task, metrics in scores.items():
            print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        results["lm_eval"] = scores
        _write_json(out_dir / RESULTS_FILE, results)
        return 0

    from deltanet_jax.evaluation import bucket_losses, evaluate_loss, plot_position_losses, position_losses

    train_len = config.train.seq_len
    seq_len = args.seq_len or train_len
    batches = args.batches or config.train.eval_batches
    try:
        val = build_data(dc, seq_len=seq_len, batch_size=args.batch_size, seed=0, eval_batches=batches).validation
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = evaluate_loss(loaded.model, val, tokenizer)
    source = dc.path or dc.corpus
    print(f"validation: {len(val)} batches of {args.batch_size} x {seq_len} tokens from {source} "
          f"(tokenizer {dc.tokenizer}, checkpoint step {loaded.step})")
    print(f"loss {report.loss:.4f} nats/token | bits per byte {report.bits_per_byte:.4f} | "
          f"perplexity {report.perplexity:.3f} | {report.tokens} tokens, {report.bytes} bytes")
    results.update(data=source, tokenizer=dc.tokenizer, seq_len=seq_len, **report.to_dict())

    if args.extrapolation:
        long_len = args.extrapolation * train_len
        try:
            long_val = build_data(dc, seq_len=long_len, batch_size=args.batch_size, seed=0,
                                  eval_batches=batches).validation
        except ValueError as err:
            print(f"error: length report at {long_len} tokens: {err}", file=sys.stderr)
            return 2
        losses, counts = position_losses(loaded.model, long_val)
        width = max(1, train_len // 2)
        buckets = bucket_losses(losses, counts, width)
        print(f"\nloss by position, windows of {long_len} tokens ({args.extrapolation}x the training length):")
        print(format_buckets(buckets, train_len))
        plot = plot_position_losses(out_dir / PLOT_FILE, losses, buckets, train_len,
                                    title=f"{args.run_dir.name} (step {loaded.step})")
        results["length_extrapolation"] = {
            "train_seq_len": train_len, "eval_seq_len": long_len, "bucket_width": width, "buckets": buckets,
            "per_position_loss": [None if math.isnan(x) else float(x) for x in losses],
        }
        print(f"plot: {plot}")
    _write_json(out_dir / RESULTS_FILE, results)
    print(f"results: {out_dir / RESULTS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
