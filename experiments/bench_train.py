"""Training-step benchmark: our jitted train step (forward, backward, AdamW) against fla's
`DeltaNetForCausalLM` (PyTorch, same config, fused AdamW) in one run on the same GPU; regenerates
the training section of BENCHMARKS.md (and, with --scaling, the multi-GPU section).

    python -m experiments.bench_train                        # 340M and 1.3B, batch 8 x 2048, writes BENCHMARKS.md
    python -m experiments.bench_train --scaling 1,2          # also ours data-parallel on 1 and 2 GPUs (340M)
    python -m experiments.bench_train --quick --no-write     # tiny model on any backend, no fla (a smoke test)

Each measurement runs in its own process, so peak memory is that model's alone. Protocol
(../shared/BENCHMARKS.md): random tokens, warm-up steps first (compilation / autotuning excluded),
median of >= 20 timed steps each ended by a device barrier; tokens/s = batch tokens / median step.
fla runs as its own benchmark does: bf16 weights and AdamW(fused=True) under bf16 autocast. Ours
computes in bf16 with parameters and Adam moments in `--param-dtype` (bfloat16 like fla by default;
float32 is what `experiments.pretrain` uses).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from typing import Any

SIZES = {"340m": "deltanet-340m", "1.3b": "deltanet-1.3b"}
QUICK_PRESET = "tiny-shakespeare"


def _model_section(preset: str) -> dict[str, Any]:
    from experiments.pretrain import load_preset

    return dict(load_preset(preset)[1]["model"])


def _median_s(step, reps: int, warmup: int) -> float:
    """Median seconds of `step()`, which blocks until its work is done."""
    from experiments.timing import median_ms

    return median_ms(step, sync=lambda _: None, reps=reps, warmup=warmup) / 1e3


def worker_ours(preset: str, batch: int, seq: int, reps: int, warmup: int, param_dtype: str, devices: int,
                implementation: str | None, remat: bool) -> dict[str, Any]:
    """Our train step on the first `devices` devices (data parallel, `batch` rows per device)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from deltanet_jax.train.config import RunConfig
    from deltanet_jax.train.distributed import global_batch
    from deltanet_jax.train.flops import peak_flops, train_flops_per_token
    from deltanet_jax.train.mesh import build_mesh
    from deltanet_jax.train.sharding import gathered
    from deltanet_jax.train.step import make_train_step
    from deltanet_jax.train.trainer import ShardedSetup

    rows = batch * devices
    dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    config = RunConfig.from_dict({
        "model": _model_section(preset),
        "train": {"batch_size": rows, "seq_len": seq, "steps": 1000, "warmup_steps": 10, "lr": 3e-4, "min_lr": 3e-5,
                  "dtype": dtype, "implementation": implementation, "remat": remat},
    })
    mesh = build_mesh({"data": devices, "fsdp": 1, "tensor": 1}, jax.devices()[:devices])
    setup = ShardedSetup(config, mesh)
    state = setup.init()
    if param_dtype != "float32":  # cast parameters and Adam moments, as fla's .to(bfloat16) does
        cast = lambda x: x.astype(param_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
        state = jax.jit(lambda s: jax.tree.map(cast, s), out_shardings=setup.shardings, donate_argnums=0)(state)
    step_fn = make_train_step(setup.graphdef, setup.tx, state_sharding=setup.shardings,
                              batch_sharding=setup.batch_sharding, compute_sharding=gathered(setup.shardings.params))
    rng = np.random.default_rng(0)
    vocab = config.model.vocab_size
    batches = [global_batch({"inputs": rng.integers(0, vocab, (rows, seq), dtype=np.int32),
                             "targets": rng.integers(0, vocab, (rows, seq), dtype=np.int32)},
                            setup.batch_sharding, rows) for _ in range(2)]
    holder = {"state": state, "i": 0}

    def step():
        holder["state"], metrics = step_fn(holder["state"], batches[holder["i"] % 2])
        holder["i"] += 1
        jax.block_until_ready(metrics["loss"])
        return metrics

    seconds = _median_s(step, reps, warmup)
    loss = float(step()["loss"])
    stats = [d.memory_stats() or {} for d in jax.devices()[:devices]]
    peak_bytes = max((s.get("peak_bytes_in_use", 0) for s in stats), default=0)
    tokens_per_s = rows * seq / seconds
    peak = peak_flops(jax.devices()[0], jnp.dtype(dtype))
    mfu = train_flops_per_token(config.model, seq) * tokens_per_s / (peak * devices) if peak else None
    return {"impl": "ours", "devices": devices, "step_ms": seconds * 1e3, "tokens_per_s": tokens_per_s,
            "peak_gib": peak_bytes / 2**30 if peak_bytes else None, "mfu": mfu, "loss": loss,
            "params": setup.num_params, "param_dtype": param_dtype, "device": jax.devices()[0].device_kind}


def worker_fla(preset: str, batch: int, seq: int, reps: int, warmup: int) -> dict[str, Any]:
    """fla's DeltaNetForCausalLM from the same config: bf16 weights, fused AdamW, bf16 autocast."""
    import torch
    from fla.models import DeltaNetConfig, DeltaNetForCausalLM

    device = torch.device("cuda")
    config = DeltaNetConfig(**_model_section(preset))
    model = DeltaNetForCausalLM(config).to(device=device, dtype=torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.01, fused=True)
    gen = torch.Generator(device=device).manual_seed(0)
    batches = [torch.randint(0, config.vocab_size, (batch, seq), device=device, generator=gen) for _ in range(2)]
    holder = {"i": 0, "loss": None}

    def step():
        tokens = batches[holder["i"] % 2]
        holder["i"] += 1
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        holder["loss"] = loss

    torch.cuda.reset_peak_memory_stats(device)
    seconds = _median_s(step, reps, warmup)
    return {"impl": "fla", "devices": 1, "step_ms": seconds * 1e3, "tokens_per_s": batch * seq / seconds,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30, "mfu": None,
            "loss": float(holder["loss"]), "params": sum(p.numel() for p in model.parameters()),
            "param_dtype": "bfloat16", "device": torch.cuda.get_device_name(device)}


def _spawn(args: list[str], timeout: int) -> dict[str, Any]:
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    out = subprocess.run([sys.executable, "-m", "experiments.bench_train", *args], capture_output=True, text=True,
                         timeout=timeout, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        return {"error": (out.stderr or out.stdout)[-1500:].strip()}
    return json.loads(lines[-1][len("RESULT "):])


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def render(rows: list[dict[str, Any]], *, batch: int, seq: int, command: str) -> str:
    """Markdown table of the results (ratios against fla of the same size)."""
    device = next((r["device"] for r in rows if "device" in r), "unknown device")
    lines = [
        "## Training step", "",
        f"`{command}` on {device}, {datetime.date.today().isoformat()}; batch {batch} x {seq} tokens per device, "
        "median of the timed steps (forward, backward, AdamW).", "",
        "| model | implementation | devices | weights | step ms | tokens/s | vs fla | peak GiB | MFU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fla = {r["size"]: r for r in rows if r.get("impl") == "fla" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['label']} | | | failed: {r['error'].splitlines()[-1][:120]} | | | | |")
            continue
        ref = fla.get(r["size"])
        ratio = "" if ref is None or r["impl"] == "fla" else f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x"
        lines.append(
            f"| {r['size']} ({r['params'] / 1e6:.0f}M) | {r['label']} | {r['devices']} | {r['param_dtype']} | "
            f"{r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {ratio} | {_fmt(r['peak_gib'], '.1f')} | "
            f"{_fmt(None if r['mfu'] is None else 100 * r['mfu'], '.1f')}{'' if r['mfu'] is None else '%'} |"
        )
    scaling = [r for r in rows if r.get("impl") == "ours" and r.get("scaling") and "error" not in r]
    base = next((r for r in scaling if r["devices"] == 1), None)
    for r in scaling:
        if base is not None and r["devices"] > 1:
            lines.append("")
            lines.append(f"Data parallel on {r['devices']} devices: {r['tokens_per_s'] / base['tokens_per_s']:.2f}x "
                         f"the tokens/s of 1 device ({r['size']}, {batch} x {seq} tokens per device).")
    return "\n".join(lines)


def main(argv=None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="340m,1.3b", help="comma list of 340m, 1.3b (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per device (default: %(default)s)")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per sequence (default: %(default)s)")
    ap.add_argument("--reps", type=int, default=20, help="timed steps (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (default: %(default)s)")
    ap.add_argument("--param-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="our parameter / Adam-moment dtype (default: %(default)s, as fla's benchmark)")
    ap.add_argument("--implementation", default=None, help="our delta-rule kernel (default: pallas on GPU)")
    ap.add_argument("--remat", action="store_true", help="our model with per-block rematerialisation")
    ap.add_argument("--no-fla", action="store_true", help="skip fla")
    ap.add_argument("--scaling", default="", help="also ours data-parallel on these device counts, e.g. 1,2 "
                    "(first size only)")
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 x 64 tokens, 3 steps, no fla")
    ap.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per measurement (default: %(default)s)")
    ap.add_argument("--worker", choices=("ours", "fla"), help=argparse.SUPPRESS)
    ap.add_argument("--preset", help=argparse.SUPPRESS)
    ap.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        if args.worker == "ours":
            result = worker_ours(args.preset, args.batch, args.seq, args.reps, args.warmup, args.param_dtype,
                                 args.devices, args.implementation, args.remat)
        else:
            result = worker_fla(args.preset, args.batch, args.seq, args.reps, args.warmup)
        print("RESULT " + json.dumps(result))
        return [result]

    if args.quick:
        args.batch, args.seq, args.reps, args.warmup, args.no_fla = 2, 64, 3, 1, True
        sizes = {"tiny": QUICK_PRESET}
    else:
        sizes = {}
        for name in args.sizes.split(","):
            if name not in SIZES:
                ap.error(f"--sizes: unknown size {name!r} (choose from {', '.join(SIZES)})")
            sizes[name] = SIZES[name]
    common = ["--batch", str(args.batch), "--seq", str(args.seq), "--reps", str(args.reps),
              "--warmup", str(args.warmup), "--param-dtype", args.param_dtype]
    if args.implementation:
        common += ["--implementation", args.implementation]
    if args.remat:
        common.append("--remat")
    scaling = [int(n) for n in args.scaling.split(",") if n]
    rows = []
    for i, (size, preset) in enumerate(sizes.items()):
        jobs = [("ours", 1, False)] + ([] if args.no_fla else [("fla", 1, False)])
        if i == 0:
            jobs += [("ours", n, True) for n in scaling if n != 1]
        for impl, devices, is_scaling in jobs:
            label = "deltanet-jax" if impl == "ours" else "fla"
            print(f"{size}: {label} on {devices} device(s) ...", file=sys.stderr, flush=True)
            result = _spawn(["--worker", impl, "--preset", preset, "--devices", str(devices), *common], args.timeout)
            result.update(size=size, label=label, impl=impl, scaling=is_scaling or (impl == "ours" and bool(scaling)))
            rows.append(result)
    command = "python -m experiments.bench_train " + " ".join(argv if argv is not None else sys.argv[1:])
    table = render(rows, batch=args.batch, seq=args.seq, command=command.strip())
    print(table)
    if not args.no_write:
        from experiments.benchmarks_md import update_section

        print("wrote", update_section("training", table))
    return rows


if __name__ == "__main__":
    rows = main()
    sys.exit(1 if any("error" in r for r in rows) else 0)
