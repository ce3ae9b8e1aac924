"""Generation benchmark: tokens per second of `deltanet_jax.generation.generate` and of fla's
`DeltaNetForCausalLM.generate` (Hugging Face generate with its cache), same config, random weights,
bf16, greedy, a fixed number of new tokens, in one run on one GPU; regenerates the generation
section of BENCHMARKS.md.

    python -m experiments.bench_generate                    # deltanet-340m, 512 + 256 tokens, batch 1 and 32
    python -m experiments.bench_generate --quick --no-write # tiny model on any backend, no fla (a smoke test)

Throughput counts the new tokens of every row over the wall time of the whole call (prefill
included, compilation excluded: one warm-up call first, then the median of --reps calls).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deltanet_jax.convert import NOT_FLA_FIELDS, config_to_fla
from deltanet_jax.generation import generate
from deltanet_jax.model import DeltaNetConfig, DeltaNetForCausalLM
from experiments.benchmarks_md import update_section
from experiments.timing import median_ms

QUICK_MODEL = dict(vocab_size=256, hidden_size=32, num_hidden_layers=1, num_heads=2, intermediate_size=64)


def median_s(fn: Callable[[], Any], reps: int, warmup: int = 1) -> float:
    """Median wall time (s) of `fn()` (which must block until its result is ready)."""
    return median_ms(fn, sync=lambda _: None, reps=reps, warmup=warmup) / 1e3


def model_config(preset: str, quick: bool) -> DeltaNetConfig:
    if quick:
        return DeltaNetConfig(**QUICK_MODEL)
    from experiments.pretrain import load_preset

    return DeltaNetConfig.from_dict(load_preset(preset)[1]["model"])


def bench_ours(config: DeltaNetConfig, prompts: np.ndarray, new_tokens: int, reps: int, dtype) -> float:
    model = DeltaNetForCausalLM(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)
    rows = prompts.tolist()

    def run():
        out = generate(model, rows, max_new_tokens=new_tokens)
        assert all(len(r) == new_tokens for r in out)  # no stop tokens: every row runs to the end

    return median_s(run, reps)


def load_fla():
    try:
        import torch
        import fla
        from fla.models import DeltaNetConfig as FlaConfig, DeltaNetForCausalLM as FlaModel
        return torch, FlaConfig, FlaModel, getattr(fla, "__version__", "?")
    except Exception as err:  # fla is an optional peer, never a dependency
        print(f"fla not importable ({type(err).__name__}: {err}); measuring without it", file=sys.stderr)
        return None


def has_fla_counterpart(config: DeltaNetConfig) -> bool:
    """Whether fla's DeltaNetForCausalLM builds the same model (else says why, on stderr)."""
    try:
        config_to_fla(config)
    except ValueError as err:
        print(f"{err}; measuring without fla", file=sys.stderr)
        return False
    return True


def bench_fla(fla, config: DeltaNetConfig, prompts: np.ndarray, new_tokens: int, reps: int) -> float:
    torch, FlaConfig, FlaModel, _ = fla
    fields = {k: v for k, v in config.to_dict().items() if k not in NOT_FLA_FIELDS}
    torch.manual_seed(0)
    model = FlaModel(FlaConfig(**fields)).to(device="cuda", dtype=torch.bfloat16).eval()
    ids = torch.from_numpy(prompts.astype(np.int64)).cuda()
    mask = torch.ones_like(ids)

    def run():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=config.eos_token_id or 0)
        torch.cuda.synchronize()
        assert out.shape[1] == ids.shape[1] + new_tokens

    t = median_s(run, reps)
    del model
    torch.cuda.empty_cache()
    return t


def render(results: dict) -> str:
    lines = [
        "## Generation",
        "",
        f"{results['preset']} (random weights, bf16 parameters and compute), prompt of {results['prompt_len']} "
        f"tokens, {results['new_tokens']} new tokens, greedy; tokens/s = batch x new tokens / wall time of the "
        f"whole call (prefill included, compilation excluded), median of {results['reps']} after a warm-up. "
        f"{results['gpu']}, jax {results['jax']}, fla {results['fla'] or 'not measured'}, {results['date']}. "
        f"`{results['command']}`",
        "",
        "| batch | ours (s) | ours (tokens/s) | fla generate (s) | fla (tokens/s) | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        fla_s = r.get("fla_s")
        fla_cells = (f"{fla_s:.3f} | {r['fla_tps']:.0f} | {r['ours_tps'] / r['fla_tps']:.1f}x" if fla_s
                     else "- | - | -")
        lines.append(f"| {r['batch']} | {r['ours_s']:.3f} | {r['ours_tps']:.0f} | {fla_cells} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="deltanet-340m", help="model preset (default: %(default)s)")
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 512; 16 with --quick)")
    ap.add_argument("--new-tokens", type=int, default=None, help="new tokens (default 256; 8 with --quick)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,32; 1,2 with --quick)")
    ap.add_argument("--reps", type=int, default=3, help="timed calls per measurement (median)")
    ap.add_argument("--quick", action="store_true", help="tiny float32 model on any backend, no fla")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    ap.add_argument("--no-fla", action="store_true", help="measure ours only")
    ap.add_argument("--json", help="also write the raw results to this JSON file")
    args = ap.parse_args(argv)
    prompt_len = args.prompt_len or (16 if args.quick else 512)
    new_tokens = args.new_tokens or (8 if args.quick else 256)
    try:
        batches = [int(b) for b in (args.batches or ("1,2" if args.quick else "1,32")).split(",")]
    except ValueError:
        ap.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if min(batches) < 1 or prompt_len < 1 or new_tokens < 1 or args.reps < 1:
        ap.error("batch sizes, --prompt-len, --new-tokens and --reps must be >= 1")
    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not args.quick:
        ap.error("the generation benchmark needs a GPU (use --quick for a smoke test on this backend)")
    config = model_config(args.preset, args.quick)
    dtype = jnp.float32 if args.quick else jnp.bfloat16
    fla = None if (args.quick or args.no_fla or not has_fla_counterpart(config)) else load_fla()
    results = dict(preset="tiny (--quick)" if args.quick else args.preset, prompt_len=prompt_len,
                   new_tokens=new_tokens, reps=args.reps, gpu=jax.devices()[0].device_kind, jax=jax.__version__,
                   fla=None if fla is None else fla[3], date=datetime.date.today().isoformat(), rows=[],
                   command="python -m experiments.bench_generate" + "".join(" " + a for a in (argv or sys.argv[1:])))
    rng = np.random.default_rng(0)
    for batch in batches:
        prompts = rng.integers(0, config.vocab_size, size=(batch, prompt_len))
        row: dict[str, Any] = dict(batch=batch)
        row["ours_s"] = bench_ours(config, prompts, new_tokens, args.reps, dtype)
        row["ours_tps"] = batch * new_tokens / row["ours_s"]
        if fla is not None:
            row["fla_s"] = bench_fla(fla, config, prompts, new_tokens, args.reps)
            row["fla_tps"] = batch * new_tokens / row["fla_s"]
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    table = render(results)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if not args.quick and not args.no_write:
        print("wrote", update_section("generation", table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
