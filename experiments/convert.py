"""Convert between fla (flash-linear-attention) DeltaNet checkpoints and our run directories.

    python -m experiments.convert FLA_DIR RUN_DIR [--tokenizer SPEC]
    python -m experiments.convert --export RUN_DIR FLA_DIR [--step N] [--dtype float32|bfloat16]
                                  [--max-shard-size 5GB]

Import reads FLA_DIR (config.json + model.safetensors, or shards + model.safetensors.index.json,
of fla's DeltaNetForCausalLM, hybrids included) and writes a new RUN_DIR (config.json and a
step-0 checkpoint) that experiments.pretrain / generate / evaluate load. A tokenizer.json in
FLA_DIR is copied into RUN_DIR and recorded as data.tokenizer. Export writes the parameters of a
run's checkpoint (the latest, or --step) as an fla checkpoint directory that fla's
`AutoModelForCausalLM.from_pretrained` loads. Every check runs before anything is written.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Sequence

DEFAULT_MAX_SHARD_SIZE = "5GB"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.convert",
        description="Import an fla DeltaNet checkpoint into a run directory, or (--export) the reverse.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m experiments.convert ~/ckpt/delta_net-340M runs/delta-340m\n"
               "  python -m experiments.convert --export runs/tiny out/tiny-fla --dtype bfloat16",
    )
    p.add_argument("source", help="FLA_DIR to import, or RUN_DIR with --export")
    p.add_argument("target", help="new RUN_DIR to write, or new FLA_DIR with --export")
    p.add_argument("--export", action="store_true", help="export RUN_DIR (source) to an fla checkpoint (target)")
    p.add_argument("--step", type=int, default=None, help="export: the checkpoint step (default: the latest)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="export: tensor dtype written (default float32, lossless)")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                   help=f"export: split the weights into shards of at most this size, with an index "
                        f"(default {DEFAULT_MAX_SHARD_SIZE}; units B, KB, MB, GB, KiB, MiB, GiB)")
    p.add_argument("--tokenizer", default=None,
                   help="import: data.tokenizer of the new run ('byte' or a tokenizer.json path; default: "
                        "FLA_DIR/tokenizer.json when present, else 'byte')")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _progress_bar(enabled: bool, desc: str):
    """A (callback, close) pair drawing a tqdm bar over tensors, or doing nothing."""
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit="tensor", file=sys.stderr, leave=False, delay=1.0)

    def update(done: int, total: int, name: str) -> None:
        bar.total = total
        bar.set_postfix_str(name[-40:], refresh=False)
        bar.update(done - bar.n)

    return update, bar.close


def import_checkpoint(fla_dir: Path, run_dir: Path, *, tokenizer: str | None = None,
                      progress: bool = True) -> None:
    """FLA_DIR -> new RUN_DIR (see the module docstring). ValueError before writing on bad input."""
    from deltanet_jax.convert import model_from_params, read_fla_config, read_fla_params
    from deltanet_jax.model import num_params
    from deltanet_jax.train.config import RunConfig
    from deltanet_jax.train.saved_model import write_model_run

    fla_dir, run_dir = Path(fla_dir), Path(run_dir)
    if not fla_dir.is_dir():
        raise ValueError(f"{fla_dir} is not a directory")
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ValueError(f"{run_dir} exists and is not empty; choose a new run directory")
    config, ignored = read_fla_config(fla_dir)
    copy_tokenizer = None
    if tokenizer is None:
        if (fla_dir / "tokenizer.json").is_file():
            copy_tokenizer = fla_dir / "tokenizer.json"
            tokenizer = str((run_dir / "tokenizer.json").resolve())
        else:
            tokenizer = "byte"
    elif tokenizer != "byte" and not Path(tokenizer).expanduser().exists():
        raise ValueError(f"--tokenizer {tokenizer!r} is neither 'byte' nor an existing tokenizer.json")
    try:
        run_config = RunConfig.from_dict({"model": config.to_dict(), "data": {"tokenizer": tokenizer}})
    except ValueError as err:
        raise ValueError(f"the imported model does not make a run config: {err}") from err

    update, close = _progress_bar(progress, "reading tensors")
    try:
        params, dtypes = read_fla_params(fla_dir, config, progress=update)
    finally:
        close()
    model = model_from_params(config, params)
    del params
    write_model_run(run_dir, run_config, model)
    if copy_tokenizer is not None:
        shutil.copyfile(copy_tokenizer, run_dir / "tokenizer.json")

    kinds = sum(config.is_attention_layer(i) for i in range(config.num_hidden_layers))
    print(f"imported {fla_dir} -> {run_dir}: {num_params(model) / 1e6:.1f}M parameters "
          f"(stored as {', '.join(dtypes)}), {config.num_hidden_layers} layers"
          + (f" ({kinds} attention)" if kinds else "") + f", tokenizer {tokenizer}")
    if ignored:
        print(f"config.json keys ignored (unknown to the converter): {', '.join(ignored)}")
    print(f"next: python -m experiments.generate --run-dir {run_dir} --prompt 'Hello'")


def export_checkpoint(run_dir: Path, fla_dir: Path, *, step: int | None = None, dtype: str = "float32",
                      max_shard_size: str = DEFAULT_MAX_SHARD_SIZE, progress: bool = True) -> None:
    """RUN_DIR checkpoint -> new FLA_DIR (see the module docstring)."""
    import jax.numpy as jnp

    from deltanet_jax.convert import EXPORT_DTYPES, config_to_fla, parse_size, save_fla_checkpoint
    from deltanet_jax.train.saved_model import load_model, read_run_config

    run_dir, fla_dir = Path(run_dir), Path(fla_dir)
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype must be one of {list(EXPORT_DTYPES)}, got {dtype!r}")
    max_bytes = parse_size(max_shard_size)
    if fla_dir.exists() and (not fla_dir.is_dir() or any(fla_dir.iterdir())):
        raise ValueError(f"{fla_dir} exists and is not empty; choose a new directory")
    run_config = read_run_config(run_dir)
    config_to_fla(run_config.model)  # refuses models fla cannot hold, before loading anything
    extra = {}
    tok = run_config.data.tokenizer
    if tok != "byte":
        path = Path(tok).expanduser()
        path = path / "tokenizer.json" if path.is_dir() else path
        if path.is_file():
            extra["tokenizer.json"] = path
        else:
            print(f"note: the run's tokenizer {tok} is not there; exporting without tokenizer.json")
    loaded = load_model(run_dir, step=step, dtype=jnp.float32)
    update, close = _progress_bar(progress, "writing tensors")
    try:
        files = save_fla_checkpoint(loaded.model, fla_dir, dtype=dtype, max_shard_bytes=max_bytes,
                                    progress=update, extra_files=extra)
    finally:
        close()
    size = sum(f.stat().st_size for f in files)
    print(f"exported {run_dir} (step {loaded.step}) -> {fla_dir}: {len(files)} files, {size / 1e6:.1f} MB, {dtype}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.export:
            if args.tokenizer is not None:
                raise ValueError("--tokenizer applies to import only")
            export_checkpoint(Path(args.source), Path(args.target), step=args.step, dtype=args.dtype,
                              max_shard_size=args.max_shard_size, progress=not args.no_progress)
        else:
            if args.step is not None:
                raise ValueError("--step applies to --export only")
            import_checkpoint(Path(args.source), Path(args.target), tokenizer=args.tokenizer,
                              progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
