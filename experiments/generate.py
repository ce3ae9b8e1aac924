"""Sample text from a trained (or converted) run.

    python -m experiments.generate --run-dir DIR --prompt TEXT [--max-new-tokens N] [--temperature T]
        [--top-k K] [--top-p P] [--seed S] [--no-cache] [--step N] [--tokenizer SPEC] [--chunk-size N]

Prints the prompt, then streams the continuation as it is decoded (a chunk of tokens per compiled
call). The tokenizer is the run's `data.tokenizer` (byte level by default; a converted fla
checkpoint carries its tokenizer.json), or `--tokenizer`. Decoding stops at the tokenizer's
end-of-sequence token when it has one. `--no-cache` recomputes the whole forward pass at every
step (slow; a check of the decoding caches).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence, TextIO


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, required=True, help="run directory (config.json + checkpoints/)")
    p.add_argument("--prompt", required=True, help="text to continue (must not be empty)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature; 0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set of probability >= P")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="recompute the full forward pass every step (a check)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step to load (default: the latest)")
    p.add_argument("--tokenizer", default=None,
                   help="'byte' or a tokenizer.json path (default: the run's data.tokenizer)")
    p.add_argument("--chunk-size", type=int, default=16,
                   help="tokens decoded per compiled call between prints (default: %(default)s)")
    return p


def resolve_tokenizer(run_dir: Path, spec: str | None, config: Any) -> Any:
    """The tokenizer of `--tokenizer`, else of the run's data.tokenizer (a tokenizer.json recorded by
    path that has moved with the run dir is looked up in the run dir)."""
    from deltanet_jax.data import load_tokenizer

    if spec is not None:
        return load_tokenizer(spec)
    spec = getattr(config.data, "tokenizer", "byte")
    if spec != "byte" and not Path(spec).expanduser().exists() and (run_dir / "tokenizer.json").is_file():
        spec = str(run_dir / "tokenizer.json")
    return load_tokenizer(spec)


class TextStream:
    """Decodes a growing token list and writes only the new text (holding back an unfinished
    multi-byte character)."""

    def __init__(self, tokenizer: Any, out: TextIO):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.shown = 0

    def add(self, ids: Sequence[int], final: bool = False) -> None:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids)
        end = len(text) if final else len(text.rstrip("\ufffd"))
        if end > self.shown:
            self.out.write(text[self.shown:end])
            self.out.flush()
            self.shown = end


def check_args(args: argparse.Namespace) -> None:
    if not args.prompt:
        raise ValueError("--prompt is empty: give at least one character to continue")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.chunk_size < 1:
        raise ValueError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    if not args.run_dir.is_dir():
        raise ValueError(f"--run-dir {args.run_dir} is not a directory")


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = sys.stdout if out is None else out
    try:
        check_args(args)
        from deltanet_jax.generation import check_prompts, generate_stream, sampling_settings
        from deltanet_jax.train.saved_model import load_model, read_run_config

        config = read_run_config(args.run_dir)
        tokenizer = resolve_tokenizer(args.run_dir, args.tokenizer, config)
        prompt = [int(t) for t in tokenizer.encode(args.prompt)]
        if not prompt:
            raise ValueError("--prompt encodes to no tokens")
        stops = () if tokenizer.eos_id is None else (int(tokenizer.eos_id),)
        sampling_settings(config.model.vocab_size, args.temperature, args.top_k, args.top_p, stops)
        loaded = load_model(args.run_dir, step=args.step)
        check_prompts(loaded.model, [prompt], args.max_new_tokens)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    out.write(args.prompt)
    out.flush()
    stream = TextStream(tokenizer, out)
    t0 = time.perf_counter()
    count = 0
    for chunk in generate_stream(loaded.model, [prompt], max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                 stop_tokens=stops, seed=args.seed, use_cache=not args.no_cache,
                                 chunk_size=args.chunk_size):
        ids = [t for t in chunk[0] if t not in stops]
        count += len(chunk[0])
        stream.add(ids)
    stream.add([], final=True)
    out.write("\n")
    out.flush()
    seconds = time.perf_counter() - t0
    print(f"[{count} tokens in {seconds:.2f} s (compilation included), checkpoint step {loaded.step}, "
          f"{'no cache' if args.no_cache else 'cached decoding'}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
