"""Pretrain a DeltaNet language model.

    python -m experiments.pretrain [--config PRESET_OR_FILE] [--run-dir DIR] [section.field=value ...]

The default preset, tiny-shakespeare, trains a small byte-level model on the embedded corpus on a
CPU. Re-running with the same --run-dir continues from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.resources
import json
import sys
import textwrap
from pathlib import Path
from typing import Any, Sequence

DEFAULT_PRESET = "tiny-shakespeare"


def preset_names() -> list[str]:
    """Names of the JSON presets shipped in experiments/configs/."""
    folder = importlib.resources.files("experiments").joinpath("configs")
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def load_preset(name_or_file: str) -> tuple[str, dict[str, Any]]:
    """(name, raw config dict) of a preset name or a JSON file path."""
    if name_or_file in preset_names():
        text = importlib.resources.files("experiments").joinpath("configs", name_or_file + ".json").read_text()
        name = name_or_file
    else:
        path = Path(name_or_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"--config {name_or_file!r} is neither a preset ({', '.join(preset_names())}) nor a JSON file"
            )
        text, name = path.read_text(), path.stem
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--config {name_or_file!r} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"--config {name_or_file!r} must hold a JSON object of sections")
    return name, raw


def _epilog() -> str:
    from deltanet_jax.train.config import RunConfig, override_help

    defaults = RunConfig.from_dict(load_preset(DEFAULT_PRESET)[1]).to_dict()
    lines = [
        f"presets (--config): {', '.join(preset_names())} (default {DEFAULT_PRESET})",
        "",
        f"overrides (section.field=value; shown with the {DEFAULT_PRESET} value):",
    ]
    for key, type_name, text in override_help():
        section, name = key.split(".", 1)
        lines.append(f"  {key} = {json.dumps(defaults[section][name])}  ({type_name})")
        if text:
            lines.append(textwrap.indent(textwrap.fill(text, 72), "      "))
    lines += [
        "",
        "run dir: runs/<preset>-<YYYYmmdd-HHMMSS> unless --run-dir is given; it receives config.json,",
        "metrics.jsonl, tensorboard/, loss.png and checkpoints/. Re-running with the same --run-dir resumes.",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.pretrain",
        description="Pretrain a DeltaNet language model (byte-level).",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=DEFAULT_PRESET, help="preset name or JSON file (default: %(default)s)")
    parser.add_argument("--run-dir", type=Path, default=None, help="run directory (created, or resumed)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config and the parameter count, then exit (allocates nothing)")
    multi = parser.add_argument_group(
        "multi-host", "several processes (one per host) training one model; every process runs the same command "
        "with its own --process-id. Without these flags, a launcher found in the environment (SLURM with "
        "several tasks, Open MPI, JAX_COORDINATOR_ADDRESS) is joined automatically")
    multi.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="address of process 0")
    multi.add_argument("--num-processes", type=int, default=None, help="number of processes")
    multi.add_argument("--process-id", type=int, default=None, help="this process's index, 0 .. N-1")
    multi.add_argument("--distributed", action="store_true",
                       help="join a multi-process run described by the environment (jax.distributed auto-detection)")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides")
    return parser


def dry_run(config) -> int:
    """Print the resolved config and the model's parameter count from abstract shapes only."""
    from flax import nnx

    from deltanet_jax.model import DeltaNetForCausalLM, num_params

    abstract = nnx.eval_shape(lambda: DeltaNetForCausalLM(config.model, rngs=nnx.Rngs(0)))
    print(json.dumps(config.to_dict(), indent=2))
    count = num_params(abstract)
    print(f"parameters: {count:,} ({count / 1e6:.1f}M)")
    return count


def main(argv: Sequence[str] | None = None):
    """Parse, check everything, then train. Bad arguments exit with status 2 before anything is written."""
    parser = build_parser()
    args = parser.parse_args(argv)

    import jax

    from deltanet_jax.data import check_data
    from deltanet_jax.train.config import ConfigError, RunConfig, apply_overrides
    from deltanet_jax.train.distributed import initialize
    from deltanet_jax.train.run_dir import RunDirError, plan_run_dir
    from deltanet_jax.train.trainer import run_mesh, train

    try:
        name, raw = load_preset(args.config)
        config = RunConfig.from_dict(apply_overrides(raw, args.overrides))
        if args.dry_run:
            return dry_run(config)
        initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)
        run_mesh(config)
        check_data(config.data, vocab_size=config.model.vocab_size)
        run_dir = args.run_dir
        if run_dir is None and jax.process_count() > 1:
            raise ValueError("--run-dir is required with several processes (they must share one directory)")
        if run_dir is None:
            run_dir = Path("runs") / f"{name}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        plan = plan_run_dir(run_dir, config)
    except (ConfigError, RunDirError, FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    try:
        return train(config, plan, progress=not args.no_progress)
    except FloatingPointError as err:  # train.nan_policy=stop: the message says what to change
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    result = main()
    stopped = getattr(result, "stopped_by", None)
    sys.exit(128 + stopped if stopped else 0)  # stopped by SIGTERM/SIGINT: 143/130, as the shell reports
