"""Training-step benchmark: our jitted train step (forward, backward, AdamW) against fla's
`DeltaNetForCausalLM` (PyTorch, same config, fused AdamW) in one run on the same GPU; regenerates
the training section of BENCHMARKS.md (and, with --scaling, the multi-GPU section).

    python -m experiments.bench_train                        # 340M and 1.3B, batch 8 x 2048, writes BENCHMARKS.md
    python -m experiments.bench_train --scaling 1,2          # also ours data-parallel on 1 and 2 GPUs (340M)
    python -m experiments.bench_train --sizes 1.3b --scaling 1,2,4,8 --layout fsdp --global-batch 256 --skip-compare
                                    # 1.3B with FSDP at 256 x 2048 tokens per step (gradient accumulation
                                    # where fewer devices hold fewer rows): tokens/s per device, efficiency
    python -m experiments.bench_train --quick --no-write     # tiny model on any backend, no fla (a smoke test)
    python -m experiments.bench_train --sizes 340m --json a.json   # parts of one comparison run apart (on
    python -m experiments.bench_train --sizes 1.3b --json b.json   # separate GPUs or allocations) ...
    python -m experiments.bench_train --from-json a.json b.json    # ... and written as one table

Each measurement runs in its own process, so peak memory is that model's alone. Protocol
(../shared/BENCHMARKS.md): random tokens, warm-up steps first (compilation / autotuning excluded),
median of >= 20 timed steps each ended by a device barrier; tokens/s = batch tokens / median step.
fla runs as its own benchmark does: bf16 weights and AdamW(fused=True) under bf16 autocast. Ours
computes in bf16 with parameters and Adam moments in `--param-dtype` (bfloat16 like fla by default;
float32 is what `experiments.pretrain` uses).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

SIZES = {"340m": "deltanet-340m", "1.3b": "deltanet-1.3b"}
QUICK_PRESET = "tiny-shakespeare"
PROGRESS = "progress: "


def _model_section(preset: str) -> dict[str, Any]:
    from experiments.pretrain import load_preset

    return dict(load_preset(preset)[1]["model"])


def _median_s(step, reps: int, warmup: int) -> float:
    """Median seconds of `step()`, which blocks until its work is done."""
    from experiments.timing import median_ms

    return median_ms(step, sync=lambda _: None, reps=reps, warmup=warmup) / 1e3


BACK_TO_BACK = 5  # steps per round of the back-to-back timing


def _back_to_back_s(step, sync, reps: int) -> float:
    """Median seconds per step of rounds of `BACK_TO_BACK` calls of `step()` (which does not wait
    for its work) with one `sync(result)` after each round, at least `reps` steps in all: the host
    runs ahead of the device as in a training loop that reads its metrics every few steps."""
    from experiments.timing import pipelined_ms

    rounds = max(4, -(-reps // BACK_TO_BACK))
    return pipelined_ms(step, sync=sync, calls=BACK_TO_BACK, reps=rounds, warmup=1) / 1e3


LAYOUTS = ("data", "fsdp", "fsdp-tp")


def scaling_mesh(layout: str, devices: int, tensor: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes of a scaling run: all devices on one axis, or FSDP x `tensor`-way
    tensor parallelism (one device: no split)."""
    if layout == "data":
        return devices, 1, 1
    if layout == "fsdp":
        return 1, devices, 1
    if devices == 1:
        return 1, 1, 1
    if devices % tensor:
        raise ValueError(f"--layout fsdp-tp: {devices} devices do not split into tensor groups of {tensor}")
    return 1, devices // tensor, tensor


KERNEL_KINDS = (  # (kind, substrings of a device kernel's name), first match wins
    ("matmul", ("gemm", "xmma", "cutlass", "cublas", "nvjet", "matmul", "triton_dot")),  # nvjet: cuBLAS on Hopper
    ("delta rule", ("delta_rule", "wy_repr", "recompute_w_u", "solve_tril", "merge_16x16", "kkt",
                    "chunk_fwd_kernel_o", "chunk_bwd_kernel")),  # ours and fla's kernels
    ("short conv", ("short_conv", "causal_conv")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def summarize_kernels(kernels: list[tuple[str, float]], steps: int, top: int = 25) -> dict[str, Any]:
    """(name, microseconds) of every device kernel over `steps` steps -> device ms per step in all
    and by kind (`KERNEL_KINDS`), and the `top` kernels by time (ms and launches per step)."""
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for name, us in kernels:
        by_name[name].append(us)
    rows = sorted(({"name": name, "kind": kernel_kind(name), "ms_per_step": sum(us) / 1e3 / steps,
                    "launches_per_step": len(us) / steps} for name, us in by_name.items()),
                  key=lambda r: -r["ms_per_step"])
    kinds: dict[str, float] = collections.defaultdict(float)
    for r in rows:
        kinds[r["kind"]] += r["ms_per_step"]
    return {"steps": steps, "device_ms_per_step": sum(kinds.values()), "by_kind": dict(kinds), "top": rows[:top]}


def profile_jax_steps(step, steps: int) -> dict[str, Any]:
    """Device kernels of `steps` more calls of `step`, from a JAX profiler trace."""
    import tempfile

    import jax

    from experiments.trace_ops import device_events, load_trace

    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            for _ in range(steps):
                step()
        device = device_events(load_trace(log_dir))
    return summarize_kernels([(e["name"], float(e.get("dur", 0.0))) for e in device], steps)


def _profile_fla(step, steps: int) -> dict[str, Any]:
    """Device kernels of `steps` more calls of `step`, from torch's profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
    kernels = [(e.name, float(e.time_range.elapsed_us()))
               for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")]
    return summarize_kernels(kernels, steps)


def print_profile(label: str, profile: dict[str, Any], file=None) -> None:
    """A `summarize_kernels` result as text (to stderr by default)."""
    file = file or sys.stderr
    if not profile["top"]:
        print(f"{label}: no device kernels in the trace (this backend records no device timeline)", file=file)
        return
    kinds = ", ".join(f"{kind} {ms:.1f}" for kind, ms in sorted(profile["by_kind"].items(), key=lambda kv: -kv[1]))
    print(f"{label}: {profile['device_ms_per_step']:.1f} device ms per step ({kinds})", file=file)
    for r in profile["top"]:
        print(f"  {r['ms_per_step']:8.3f} ms  x{r['launches_per_step']:<5g} {r['kind']:10s} {r['name'][:100]}", file=file)


def worker_ours(preset: str, rows: int, seq: int, reps: int, warmup: int, param_dtype: str,
                mesh_shape: tuple[int, int, int], grad_accum: int, implementation: str | None,
                remat: bool, loss_chunk: int = 0, profile_steps: int = 0) -> dict[str, Any]:
    """Our train step over a (data, fsdp, tensor) mesh of the first devices: `rows` sequences per
    optimizer step, in `grad_accum` micro-batches."""
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

    start = time.perf_counter()
    devices = mesh_shape[0] * mesh_shape[1] * mesh_shape[2]
    dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    config = RunConfig.from_dict({
        "model": _model_section(preset),
        "train": {"batch_size": rows, "seq_len": seq, "steps": 1000, "warmup_steps": 10, "lr": 3e-4, "min_lr": 3e-5,
                  "dtype": dtype, "implementation": implementation, "remat": remat, "grad_accum": grad_accum,
                  "loss_chunk": loss_chunk},
    })
    mesh = build_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_shape)), jax.devices()[:devices])
    setup = ShardedSetup(config, mesh)
    state = setup.init()
    _progress(f"{setup.num_params / 1e6:.0f}M parameters initialised on a {mesh_shape} mesh", start)
    if param_dtype != "float32":  # cast parameters and Adam moments, as fla's .to(bfloat16) does
        cast = lambda x: x.astype(param_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
        state = jax.jit(lambda s: jax.tree.map(cast, s), out_shardings=setup.shardings, donate_argnums=0)(state)
    step_fn = make_train_step(setup.graphdef, setup.tx, grad_accum=grad_accum, state_sharding=setup.shardings,
                              batch_sharding=setup.batch_sharding, compute_sharding=gathered(setup.shardings.params),
                              loss_chunk=config.train.loss_chunk)
    rng = np.random.default_rng(0)
    vocab = config.model.vocab_size
    batches = [global_batch({"inputs": rng.integers(0, vocab, (rows, seq), dtype=np.int32),
                             "targets": rng.integers(0, vocab, (rows, seq), dtype=np.int32)},
                            setup.batch_sharding, rows) for _ in range(2)]
    holder = {"state": state, "i": 0}

    def dispatch():
        holder["state"], metrics = step_fn(holder["state"], batches[holder["i"] % 2])
        holder["i"] += 1
        return metrics

    def step():
        return jax.block_until_ready(dispatch())

    step()
    _progress("first step done (compilation included)", start)
    seconds = _median_s(step, reps, warmup)
    _progress(f"{warmup} warm-up and {reps} timed steps done: {seconds * 1e3:.1f} ms per step", start)
    back_to_back = _back_to_back_s(dispatch, lambda m: jax.block_until_ready((holder["state"], m)), reps)
    _progress(f"back to back: {back_to_back * 1e3:.1f} ms per step", start)
    loss = float(step()["loss"])
    profile = profile_jax_steps(step, profile_steps) if profile_steps else None
    stats = [d.memory_stats() or {} for d in jax.devices()[:devices]]
    peak_bytes = max((s.get("peak_bytes_in_use", 0) for s in stats), default=0)
    tokens_per_s = rows * seq / seconds
    peak = peak_flops(jax.devices()[0], jnp.dtype(dtype))
    mfu = train_flops_per_token(config.model, seq) * tokens_per_s / (peak * devices) if peak else None
    return {"impl": "ours", "devices": devices, "mesh": list(mesh_shape), "rows": rows, "grad_accum": grad_accum,
            "step_ms": seconds * 1e3, "tokens_per_s": tokens_per_s,
            "back_to_back_ms": back_to_back * 1e3, "back_to_back_tokens_per_s": rows * seq / back_to_back,
            "peak_gib": peak_bytes / 2**30 if peak_bytes else None, "mfu": mfu, "loss": loss,
            "params": setup.num_params, "param_dtype": param_dtype, "device": jax.devices()[0].device_kind,
            "profile": profile}


def worker_fla(preset: str, batch: int, seq: int, reps: int, warmup: int, profile_steps: int = 0) -> dict[str, Any]:
    """fla's DeltaNetForCausalLM from the same config: bf16 weights, fused AdamW, bf16 autocast."""
    import torch
    from fla.models import DeltaNetConfig, DeltaNetForCausalLM

    start = time.perf_counter()
    device = torch.device("cuda")
    config = DeltaNetConfig(**_model_section(preset))
    model = DeltaNetForCausalLM(config).to(device=device, dtype=torch.bfloat16)
    _progress("model built", start)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.01, fused=True)
    gen = torch.Generator(device=device).manual_seed(0)
    batches = [torch.randint(0, config.vocab_size, (batch, seq), device=device, generator=gen) for _ in range(2)]
    holder = {"i": 0, "loss": None}

    def dispatch():
        tokens = batches[holder["i"] % 2]
        holder["i"] += 1
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        holder["loss"] = loss

    def step():
        dispatch()
        torch.cuda.synchronize(device)

    torch.cuda.reset_peak_memory_stats(device)
    step()
    _progress("first step done (autotuning included)", start)
    seconds = _median_s(step, reps, warmup)
    _progress(f"{warmup} warm-up and {reps} timed steps done: {seconds * 1e3:.1f} ms per step", start)
    back_to_back = _back_to_back_s(dispatch, lambda _: torch.cuda.synchronize(device), reps)
    _progress(f"back to back: {back_to_back * 1e3:.1f} ms per step", start)
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    profile = _profile_fla(step, profile_steps) if profile_steps else None
    return {"impl": "fla", "devices": 1, "step_ms": seconds * 1e3, "tokens_per_s": batch * seq / seconds,
            "back_to_back_ms": back_to_back * 1e3, "back_to_back_tokens_per_s": batch * seq / back_to_back,
            "peak_gib": peak_gib, "mfu": None,
            "loss": float(holder["loss"]), "params": sum(p.numel() for p in model.parameters()),
            "param_dtype": "bfloat16", "device": torch.cuda.get_device_name(device), "profile": profile}


def _progress(message: str, start: float) -> None:
    """A worker's progress line (the parent echoes these as they come)."""
    print(f"{PROGRESS}{time.perf_counter() - start:7.1f} s  {message}", file=sys.stderr, flush=True)


def _spawn(args: list[str], timeout: int) -> dict[str, Any]:
    """Run one worker; echo its progress lines while it runs; its RESULT, or {"error": ...} with the
    end of its output (also on a timeout)."""
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    proc = subprocess.Popen([sys.executable, "-m", "experiments.bench_train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    out: list[str] = []
    err: collections.deque = collections.deque(maxlen=60)

    def pump_err():
        for line in proc.stderr:
            err.append(line)
            if line.startswith(PROGRESS):
                print("    " + line[len(PROGRESS):].rstrip(), file=sys.stderr, flush=True)

    pumps = [threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True),
             threading.Thread(target=pump_err, daemon=True)]
    for t in pumps:
        t.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        for t in pumps:
            t.join(5)
        return {"error": f"timed out after {timeout} s (--timeout); last output: " + "".join(err)[-1000:].strip()}
    for t in pumps:
        t.join()
    lines = [line for line in out if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": ("".join(err) or "".join(out))[-1500:].strip()}
    return json.loads(lines[-1][len("RESULT "):])


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def render(rows: list[dict[str, Any]], *, batch: int, seq: int, command: str) -> str:
    """Markdown table of the single-device results (ratios against fla of the same size)."""
    device = next((r["device"] for r in rows if "device" in r), "unknown device")
    lines = [
        "## Training step", "",
        f"`{command}` on {device}, {datetime.date.today().isoformat()}; batch {batch} x {seq} tokens per device, "
        "median of the timed steps (forward, backward, AdamW). Step ms: each step ended by a device "
        f"barrier; back to back: rounds of {BACK_TO_BACK} steps with one barrier after the last, the host "
        "running ahead as in a training loop that reads its metrics every few steps.", "",
        "| model | implementation | devices | weights | step ms | tokens/s | vs fla | back-to-back step ms |"
        " back-to-back tokens/s | vs fla | peak GiB | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fla = {r["size"]: r for r in rows if r.get("impl") == "fla" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['label']} | | | failed: {r['error'].splitlines()[-1][:120]} | | | | | | "
                         "| |")
            continue
        ref = fla.get(r["size"])
        ratio, ratio_b2b = "", ""
        if ref is not None and r["impl"] != "fla":
            ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x"
            if r.get("back_to_back_tokens_per_s") and ref.get("back_to_back_tokens_per_s"):
                ratio_b2b = f"{r['back_to_back_tokens_per_s'] / ref['back_to_back_tokens_per_s']:.2f}x"
        lines.append(
            f"| {r['size']} ({r['params'] / 1e6:.0f}M) | {r['label']} | {r['devices']} | {r['param_dtype']} | "
            f"{r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {ratio} | {_fmt(r.get('back_to_back_ms'), '.1f')} | "
            f"{_fmt(r.get('back_to_back_tokens_per_s'), ',.0f')} | {ratio_b2b} | {_fmt(r['peak_gib'], '.1f')} | "
            f"{_fmt(None if r['mfu'] is None else 100 * r['mfu'], '.1f')}{'' if r['mfu'] is None else '%'} |"
        )
    return "\n".join(lines)


def render_scaling(rows: list[dict[str, Any]], *, size: str, layout: str, seq: int, command: str) -> str:
    """Markdown table of a scaling run: tokens/s per device and its ratio to the 1-device figure."""
    device = next((r["device"] for r in rows if "device" in r), "unknown device")
    lines = [
        f"## Scaling: {size}, {layout}", "",
        f"`{command}` on {device}, {datetime.date.today().isoformat()}; {seq}-token sequences, median of the "
        "timed optimizer steps (gradient accumulation inside the step where the mesh holds fewer rows than"
        " the global batch); efficiency = tokens/s per device against 1 device.", "",
        "| devices | mesh (data, fsdp, tensor) | sequences / step | micro-batches | step ms | tokens/s |"
        " tokens/s per device | efficiency | peak GiB per device | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = next((r for r in rows if r.get("devices") == 1 and "error" not in r), None)
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['devices_asked']} | | | | failed: {r['error'].splitlines()[-1][:120]} | | | | | |")
            continue
        per_device = r["tokens_per_s"] / r["devices"]
        eff = "" if base is None else f"{100 * per_device / base['tokens_per_s']:.0f}%"
        lines.append(
            f"| {r['devices']} | {', '.join(map(str, r['mesh']))} | {r['rows']} | {r['grad_accum']} | "
            f"{r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {per_device:,.0f} | {eff} | "
            f"{_fmt(r['peak_gib'], '.1f')} | {_fmt(None if r['mfu'] is None else 100 * r['mfu'], '.1f')}"
            f"{'' if r['mfu'] is None else '%'} |")
    return "\n".join(lines)


def plan_scaling(counts: list[int], layout: str, tensor: int, batch: int, global_batch: int | None):
    """[(devices, mesh, rows, grad_accum)] of a scaling run, or ValueError naming what does not divide.
    `batch` sequences per batch-sharded device per micro-batch; `global_batch` sequences per step
    (default: batch x batch-sharded devices, no accumulation)."""
    plan = []
    for n in counts:
        mesh = scaling_mesh(layout, n, tensor)
        per_micro = batch * mesh[0] * mesh[1]          # tensor-parallel devices share their rows
        rows = per_micro if global_batch is None else global_batch
        if rows % per_micro:
            raise ValueError(f"--global-batch {rows} is not a multiple of {per_micro} (--batch {batch} x "
                             f"{mesh[0] * mesh[1]} batch-sharded devices on {n} devices)")
        plan.append((n, mesh, rows, rows // per_micro))
    return plan


def main(argv=None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="340m,1.3b", help="comma list of 340m, 1.3b (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per device (per batch-sharded device and"
                    " micro-batch in scaling runs; default: %(default)s)")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per sequence (default: %(default)s)")
    ap.add_argument("--reps", type=int, default=20, help="timed steps (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (default: %(default)s)")
    ap.add_argument("--param-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="our parameter / Adam-moment dtype (default: %(default)s, as fla's benchmark)")
    ap.add_argument("--implementation", default=None, help="our delta-rule kernel (default: pallas on GPU)")
    ap.add_argument("--remat", action="store_true", help="our model with per-block rematerialisation")
    ap.add_argument("--loss-chunk", type=int, default=0, help="our loss computes logits this many positions at a"
                    " time (train.loss_chunk; default: %(default)s = all at once)")
    ap.add_argument("--no-fla", action="store_true", help="skip fla")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="after timing, trace STEPS more steps of each compared model and print its device"
                         " kernels: ms per step by kind (matmul, delta rule, ...) and the largest ones")
    ap.add_argument("--skip-compare", action="store_true", help="only the scaling runs, not ours against fla")
    ap.add_argument("--scaling", default="", help="also ours on these device counts, e.g. 1,2,4,8, laid out by"
                    " --layout, for the first of --sizes (a table of tokens/s per device)")
    ap.add_argument("--layout", choices=LAYOUTS, default="data",
                    help="scaling mesh: data parallel, FSDP, or FSDP x --tensor-way tensor parallel (default: %(default)s)")
    ap.add_argument("--tensor", type=int, default=2, help="tensor-parallel group size of --layout fsdp-tp"
                    " (default: %(default)s)")
    ap.add_argument("--global-batch", type=int, default=None, help="sequences per optimizer step in scaling runs,"
                    " the same on every device count (gradient accumulation makes up the rows; default: --batch"
                    " per batch-sharded device)")
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 x 64 tokens, 3 steps, no fla")
    ap.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per measurement (default: %(default)s)")
    ap.add_argument("--json", help="also write the raw results (rows, command, settings) to this JSON file")
    ap.add_argument("--from-json", nargs="+", metavar="JSON", help="run nothing: write the tables of the results"
                    " that earlier --json runs saved (rows of the same size and layout share a table)")
    ap.add_argument("--worker", choices=("ours", "fla"), help=argparse.SUPPRESS)
    ap.add_argument("--preset", help=argparse.SUPPRESS)
    ap.add_argument("--mesh", default="1,1,1", help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--grad-accum", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if min(args.batch, args.seq, args.reps, args.tensor) < 1 or min(args.warmup, args.loss_chunk, args.profile) < 0 or (
            args.global_batch or 1) < 1:
        ap.error("--batch, --seq, --reps, --tensor and --global-batch must be positive, --warmup, --loss-chunk and"
                 " --profile >= 0")

    if args.worker:
        if args.worker == "ours":
            mesh = tuple(int(x) for x in args.mesh.split(","))
            rows = args.rows or args.batch
            result = worker_ours(args.preset, rows, args.seq, args.reps, args.warmup, args.param_dtype, mesh,
                                 args.grad_accum, args.implementation, args.remat, args.loss_chunk, args.profile)
        else:
            result = worker_fla(args.preset, args.batch, args.seq, args.reps, args.warmup, args.profile)
        print("RESULT " + json.dumps(result))
        return [result]

    if args.from_json:
        try:
            return write_saved(args.from_json, write=not args.no_write)
        except (OSError, ValueError, KeyError) as err:
            ap.error(f"--from-json: {err}")
    if args.quick:
        args.batch, args.seq, args.reps, args.warmup, args.no_fla = 2, 64, 3, 1, True
        sizes = {"tiny": QUICK_PRESET}
    else:
        sizes = {}
        for name in args.sizes.split(","):
            if name not in SIZES:
                ap.error(f"--sizes: unknown size {name!r} (choose from {', '.join(SIZES)})")
            sizes[name] = SIZES[name]
    try:
        scaling = [int(n) for n in args.scaling.split(",") if n]
    except ValueError:
        ap.error(f"--scaling takes device counts like 1,2,4,8; got {args.scaling!r}")
    if any(n < 1 for n in scaling):
        ap.error("--scaling: device counts must be >= 1")
    if args.skip_compare and not scaling:
        ap.error("--skip-compare leaves nothing to run without --scaling")
    try:
        plan = plan_scaling(scaling, args.layout, args.tensor, args.batch, args.global_batch)
    except ValueError as err:
        ap.error(str(err))
    common = ["--seq", str(args.seq), "--reps", str(args.reps), "--warmup", str(args.warmup),
              "--param-dtype", args.param_dtype]
    if args.implementation:
        common += ["--implementation", args.implementation]
    if args.remat:
        common.append("--remat")
    if args.loss_chunk:
        common += ["--loss-chunk", str(args.loss_chunk)]
    command = "python -m experiments.bench_train " + " ".join(argv if argv is not None else sys.argv[1:])
    rows, scaled = [], []
    for size, preset in ([] if args.skip_compare else sizes.items()):
        for impl in ["ours"] + ([] if args.no_fla else ["fla"]):
            label = "deltanet-jax" if impl == "ours" else "fla"
            print(f"{size}: {label} on 1 device ...", file=sys.stderr, flush=True)
            profile = ["--profile", str(args.profile)] if args.profile else []
            result = _spawn(["--worker", impl, "--preset", preset, "--batch", str(args.batch), *common, *profile],
                            args.timeout)
            result.update(size=size, label=label, impl=impl)
            rows.append(result)
            if result.get("profile"):
                print_profile(f"{size} {label}", result["profile"])
    size, preset = next(iter(sizes.items()))
    for n, mesh, global_rows, accum in plan:
        print(f"{size}: deltanet-jax on {n} device(s), mesh {mesh}, {global_rows} sequences in {accum} "
              "micro-batch(es) ...", file=sys.stderr, flush=True)
        result = _spawn(["--worker", "ours", "--preset", preset, "--mesh", ",".join(map(str, mesh)),
                         "--rows", str(global_rows), "--grad-accum", str(accum), *common], args.timeout)
        result.update(size=size, devices_asked=n)
        scaled.append(result)
    saved = dict(command=command.strip(), batch=args.batch, seq=args.seq, size=size, layout=args.layout,
                 rows=rows, scaled=scaled)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(saved, f, indent=1)
    _write_tables(_tables([saved]), write=not args.no_write)
    return rows + scaled


def _tables(saved: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(BENCHMARKS.md section, markdown) of saved runs: one training table of every compared row (one
    batch shape), one scaling table per (size, layout)."""
    tables = []
    compared = [s for s in saved if s["rows"]]
    if compared:
        if len({(s["batch"], s["seq"]) for s in compared}) > 1:
            raise ValueError("the compared rows were measured at different batch shapes: "
                             + ", ".join(f"{s['batch']} x {s['seq']}" for s in compared))
        tables.append(("training", render([r for s in compared for r in s["rows"]], batch=compared[0]["batch"],
                                          seq=compared[0]["seq"], command="; ".join(s["command"] for s in compared))))
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for s in saved:
        if s["scaled"]:
            groups.setdefault((s["size"], s["layout"]), []).append(s)
    for (size, layout), group in groups.items():
        scaled = sorted((r for s in group for r in s["scaled"]), key=lambda r: r["devices_asked"])
        tables.append((f"scaling-{size}-{layout}",
                       render_scaling(scaled, size=size, layout=layout, seq=group[0]["seq"],
                                      command="; ".join(s["command"] for s in group))))
    return tables


def _write_tables(tables: list[tuple[str, str]], write: bool) -> None:
    for name, table in tables:
        print(table)
        if write:
            from experiments.benchmarks_md import update_section

            print("wrote", update_section(name, table))


def write_saved(paths: list[str], write: bool = True) -> list[dict[str, Any]]:
    """Print (and write to BENCHMARKS.md) the tables of results saved by earlier `--json` runs."""
    saved = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        missing = [k for k in ("command", "batch", "seq", "size", "layout", "rows", "scaled") if k not in data]
        if missing:
            raise ValueError(f"{path} is not a bench_train --json file (no {', '.join(missing)})")
        saved.append(data)
    _write_tables(_tables(saved), write)
    return [r for s in saved for r in s["rows"] + s["scaled"]]


if __name__ == "__main__":
    rows = main()
    sys.exit(1 if any("error" in r for r in rows) else 0)
