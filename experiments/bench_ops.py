"""Delta-rule op benchmark: the Pallas kernels, the XLA chunked path and fla (when importable), all
in one run on one GPU, forward and forward+backward (gradients of q, k, v, beta and the initial
state), bf16 inputs; regenerates the ops section of BENCHMARKS.md.

    python -m experiments.bench_ops                 # full table, writes BENCHMARKS.md
    python -m experiments.bench_ops --sweep         # also time launch choices of each kernel
    python -m experiments.bench_ops --breakdown     # also time each kernel, ours and fla's
    python -m experiments.bench_ops --sweep --dtype float32 --skip-table --shapes 2x256x2x256   # float32 launches
    python -m experiments.bench_ops --sweep wy_inverse wy_inverse_doubling --skip-table   # the two diagonal inverses
    python -m experiments.bench_ops --quick --no-write   # tiny shapes, any backend (a smoke test)
    python -m experiments.bench_ops --from-json a.json b.json   # rows of earlier --json runs as one table
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from deltanet_jax.ops import delta_rule
from experiments.benchmarks_md import update_section
from experiments.timing import median_ms, pipelined_ms

SHAPES = [(8, 2048, 16, 128), (2, 8192, 16, 128), (16, 2048, 32, 64), (1, 32768, 16, 128)]
QUICK_SHAPES = [(1, 128, 2, 16)]
MEMORY_SHAPE = (1, 32768, 16, 128)


def make_inputs(shape, seed=0):
    """bf16 q, k (L2-normalised), v, beta = sigmoid(randn), float32 initial state, bf16 dO (NumPy)."""
    B, T, H, D = shape
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H, D), np.float32)
    k = rng.standard_normal((B, T, H, D), np.float32)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((B, T, H, D), np.float32)
    beta = 1 / (1 + np.exp(-rng.standard_normal((B, T, H), np.float32)))
    h0 = rng.standard_normal((B, H, D, D), np.float32) * 0.1
    do = rng.standard_normal((B, T, H, D), np.float32)
    return q, k, v, beta, h0, do


def jax_inputs(np_inputs, dtype=jnp.bfloat16) -> list:
    """`make_inputs`'s arrays on the default device, q, k, v and dO in `dtype` (beta and h0 float32)."""
    q, k, v, beta, h0, do = (jnp.asarray(x) for x in np_inputs)
    return [q.astype(dtype), k.astype(dtype), v.astype(dtype), beta, h0, do.astype(dtype)]


def jax_fns(impl, config=None):
    """Jitted forward and forward+backward of `delta_rule`; with a `KernelConfig`, the Pallas kernels
    called directly with those launch choices."""
    def op(q, k, v, beta, h0):
        if config is None:
            return delta_rule(q, k, v, beta, initial_state=h0, output_final_state=True, implementation=impl)
        from pallas_kernels.delta_rule import chunk_delta_rule
        return chunk_delta_rule(q, k, v, beta, scale=q.shape[-1] ** -0.5, initial_state=h0, config=config,
                                interpret=jax.default_backend() != "gpu")

    def fwd_bwd(q, k, v, beta, h0, do):
        o, pull = jax.vjp(lambda *a: op(*a)[0], q, k, v, beta, h0)
        return o, pull(do)
    return jax.jit(op), jax.jit(fwd_bwd)


def parse_config(items: list) -> dict:
    """`FIELD=VALUE` overrides of `KernelConfig` (booleans, integers, or warps,stages for launches)."""
    from pallas_kernels.delta_rule.common import KernelConfig, Launch

    fields = {f.name: f for f in dataclasses.fields(KernelConfig)}
    out = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in fields:
            raise argparse.ArgumentTypeError(f"--config takes FIELD=VALUE with FIELD one of {', '.join(fields)};"
                                             f" got {item!r}")
        default = getattr(KernelConfig(), name)
        try:
            if isinstance(default, bool):
                if text not in ("true", "false", "True", "False", "1", "0"):
                    raise ValueError(text)
                out[name] = text in ("true", "True", "1")
            elif isinstance(default, Launch):
                warps, stages = (int(x) for x in text.split(","))
                out[name] = Launch(warps, stages)
            else:
                out[name] = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--config {name}: cannot read {text!r} (like {default!r};"
                                             " launches as WARPS,STAGES)")
    return out


def pallas_config(shape, overrides: dict):
    """The op's launch choices at `shape` (B, T, H, D) with `overrides` applied; None (the op's own
    defaults) when there are none."""
    if not overrides:
        return None
    from pallas_kernels.delta_rule.common import KernelConfig
    B, _, H, D = shape
    return dataclasses.replace(KernelConfig.for_shape(D, D, B * H), **overrides)


def _timings(fwd, fwd_bwd, reps: int, back_to_back: bool, sync=jax.block_until_ready) -> dict:
    """ms of `fwd()` and `fwd_bwd()`: each call ended by a barrier (median of `reps`), and with
    `back_to_back` also per call over rounds of back-to-back calls (`pipelined_ms`, median of `reps`
    rounds: the device time, host overhead hidden as inside a larger program)."""
    times = dict(fwd=median_ms(fwd, sync=sync, reps=reps), fwdbwd=median_ms(fwd_bwd, sync=sync, reps=reps))
    if back_to_back:
        times.update(fwd_b2b=pipelined_ms(fwd, sync=sync, reps=reps),
                     fwdbwd_b2b=pipelined_ms(fwd_bwd, sync=sync, reps=reps))
    return times


def bench_jax(impl, arrays, reps, config=None, back_to_back=False):
    """(times, as `_timings`; the forward's o as float32 NumPy)."""
    q, k, v, beta, h0, do = arrays
    fwd, fwd_bwd = jax_fns(impl, config)
    times = _timings(lambda: fwd(q, k, v, beta, h0), lambda: fwd_bwd(q, k, v, beta, h0, do), reps, back_to_back)
    return times, np.asarray(fwd(q, k, v, beta, h0)[0].astype(jnp.float32))


def jax_peak_gib(impl, arrays):
    """Arguments + outputs + temporaries of the compiled forward+backward, in GiB."""
    _, fwd_bwd = jax_fns(impl)
    mem = fwd_bwd.lower(*arrays).compile().memory_analysis()
    return (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes) / 2**30


def load_fla():
    try:
        import torch
        from fla.ops.delta_rule import chunk_delta_rule
        import fla
        return torch, chunk_delta_rule, getattr(fla, "__version__", "?")
    except Exception as err:  # fla is an optional peer, never a dependency
        print(f"fla not importable ({type(err).__name__}: {err}); measuring without it", file=sys.stderr)
        return None


def bench_fla(fla, np_inputs, reps, peak=False, back_to_back=False):
    """(times, as `_timings`; fla's o as float32 NumPy; peak GiB of forward+backward if `peak`)."""
    torch, chunk_delta_rule, _ = fla
    q, k, v, beta, h0, do = (torch.from_numpy(x).cuda() for x in np_inputs)
    q, k, v, do = (x.to(torch.bfloat16) for x in (q, k, v, do))
    beta = beta.to(torch.bfloat16)
    sync = lambda _: torch.cuda.synchronize()
    with torch.no_grad():
        o = chunk_delta_rule(q, k, v, beta, initial_state=h0, output_final_state=True)[0].float().cpu().numpy()
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, beta, h0)]

    def fwd():
        with torch.no_grad():
            return chunk_delta_rule(q, k, v, beta, initial_state=h0, output_final_state=True)

    def fwd_bwd():
        for x in leaves:
            x.grad = None
        out, _ = chunk_delta_rule(*leaves[:4], initial_state=leaves[4], output_final_state=False)
        out.backward(do)
        return out

    times = _timings(fwd, fwd_bwd, reps, back_to_back, sync=sync)
    gib = None
    if peak:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        torch.cuda.synchronize()
        gib = torch.cuda.max_memory_allocated() / 2**30
    return times, o, gib


SWEEPS = {  # kernel -> (V-tile widths, warps, stages) tried by --sweep
    "wy": ((0,), (1, 2, 4), (1, 2)),
    "wy_apply": ((0,), (1, 2, 4), (1, 2)),
    "wy_inverse": ((0,), (1, 2, 4, 8), (1, 2)),
    "wy_inverse_doubling": ((0,), (2, 4, 8), (1,)),   # KernelConfig.doubling_inverse (no loop to pipeline)
    "fwd": ((32, 64), (4, 8), (1, 2, 3)),
    "fwd_from_t": ((16, 32, 64), (4, 8), (1, 2, 3)),
    "states": ((32, 64), (4, 8), (1, 2, 3)),
    "state_grads": ((32, 64), (4, 8), (1, 2, 3)),
    "dqkw": ((32, 64, 128), (2, 4, 8, 16), (1, 2)),
    "wy_bwd": ((32, 64), (2, 4, 8), (1, 2)),
}


KERNEL_LABELS = {  # kernel -> its name in the breakdown
    "wy": "wy_prepare (+T)", "wy_doubling": "wy_prepare (+T, doubling)",
    "wy_inverse": "wy_inverse (T, P)", "wy_inverse_doubling": "wy_inverse (T, P, doubling)",
    "fwd": "chunk_forward", "fwd_from_t": "chunk_forward_from_t", "wy_apply": "wy_apply",
    "states": "chunk_states", "state_grads": "chunk_state_grads", "dqkw": "chunk_dqkw", "wy_bwd": "wy_backward",
}


def kernel_calls(shape, dtype=jnp.bfloat16):
    """Every Pallas kernel at `shape` as `name -> fn(launch, block_v)` on fixed random inputs in
    `dtype` (each kernel's upstream results computed once, with the op's launch choices), and the
    NumPy inputs; the `_doubling` variants of `wy` and `wy_inverse` invert the diagonal blocks by
    doubling, the others by substitution."""
    from pallas_kernels.delta_rule.chunk_bwd import chunk_dqkw, chunk_state_grads, wy_backward
    from pallas_kernels.delta_rule.chunk_fwd import chunk_forward, chunk_forward_from_t
    from pallas_kernels.delta_rule.common import KernelConfig, Static
    from pallas_kernels.delta_rule.wy import wy_apply, wy_inverse, wy_prepare

    np_in = make_inputs(shape)
    q, k, v, beta, h0, do = jax_inputs(np_in, dtype)
    B, _, H, D = shape
    cf = KernelConfig.for_shape(D, D, B * H, jnp.dtype(dtype).itemsize)
    st = Static(scale=D ** -0.5, qk_l2norm=False, has_segments=False,
                interpret=jax.default_backend() != "gpu")
    w, u, tm, p = wy_prepare(k, v, beta, None, q, static=st, with_t=True, launch=cf.wy)
    vn, _, h = chunk_forward(q, k, w, u, None, h0, static=st, states=True, block_v=cf.fwd_block_v, launch=cf.states)
    dvn, _, dh = chunk_state_grads(q, k, w, do, p, None, None, static=st, block_v=cf.bwd_block_v,
                                   launch=cf.state_grads)
    _, dkp, dw = chunk_dqkw(q, k, vn, dvn, do, h, dh, None, static=st, block_v=cf.dqkw_block_v, launch=cf.dqkw)
    calls = {
        "wy": lambda L, bv: wy_prepare(k, v, beta, None, q, static=st, with_t=True, launch=L),
        "wy_doubling": lambda L, bv: wy_prepare(k, v, beta, None, q, static=st, with_t=True, launch=L, doubling=True),
        "wy_inverse": lambda L, bv: wy_inverse(k, beta, None, q, static=st, launch=L),
        "wy_inverse_doubling": lambda L, bv: wy_inverse(k, beta, None, q, static=st, launch=L, doubling=True),
        "fwd": lambda L, bv: chunk_forward(q, k, w, u, None, h0, p, static=st, block_v=bv, launch=L),
        "fwd_from_t": lambda L, bv: chunk_forward_from_t(q, k, v, beta, tm, None, h0, p, static=st, block_v=bv,
                                                         launch=L),
        "wy_apply": lambda L, bv: wy_apply(k, v, beta, tm, q, None, static=st, launch=L),
        "states": lambda L, bv: chunk_forward(q, k, w, u, None, h0, static=st, states=True, block_v=bv, launch=L),
        "state_grads": lambda L, bv: chunk_state_grads(q, k, w, do, p, None, None, static=st, block_v=bv,
                                                       launch=L),
        "dqkw": lambda L, bv: chunk_dqkw(q, k, vn, dvn, do, h, dh, None, static=st, block_v=bv, launch=L),
        "wy_bwd": lambda L, bv: wy_backward(k, v, beta, tm, dw, dvn, dkp, None, static=st, block_v=bv, launch=L),
    }
    return calls, np_in


def sweep(shape, reps, kernels, dtype=jnp.bfloat16):
    """Time launch choices of each named Pallas kernel alone at one shape on `dtype` inputs; prints
    and returns rows (a launch the compiler refuses, for resources say, is a NaN row and a message)."""
    from pallas_kernels.delta_rule.common import Launch

    cands, _ = kernel_calls(shape, dtype)
    rows = []
    for name in kernels:
        bvs, warps, stages = SWEEPS[name]
        for bv in bvs:
            for L in (Launch(w_, s_) for w_ in warps for s_ in stages):
                try:
                    ms = pipelined_ms(lambda: cands[name](L, bv), reps=max(3, reps // 4))
                except Exception as err:  # a launch the compiler refuses (resources) is skipped
                    ms = float("nan")
                    print(f"  {name} bv={bv} {L}: {type(err).__name__}", file=sys.stderr)
                rows.append(dict(shape=shape, kernel=name, block_v=bv, num_warps=L.num_warps, num_stages=L.num_stages, ms=ms))
                print(f"sweep {shape} {name:12s} bv={bv:3d} warps={L.num_warps} stages={L.num_stages}: {ms:.3f} ms",
                      flush=True)
    return rows


def breakdown(shape, calls: int = 20, with_fla: bool = True, overrides: dict | None = None,
              dtype=jnp.bfloat16) -> list:
    """Device time of each kernel of the forward and backward passes alone at one shape on `dtype`
    inputs, with the launch choices the op uses (`KernelConfig.for_shape` with `overrides`), and of
    each of fla's kernels (bf16) when importable; prints and returns rows (impl, kernel, ms)."""
    from pallas_kernels.delta_rule.common import KernelConfig

    B, T, H, D = shape
    cf = dataclasses.replace(KernelConfig.for_shape(D, D, B * H, jnp.dtype(dtype).itemsize), **(overrides or {}))
    kernels, np_in = kernel_calls(shape, dtype)
    launches = {"wy": (cf.wy, 0), "wy_doubling": (cf.wy, 0), "wy_inverse": (cf.wy_inverse, 0),
                "wy_inverse_doubling": (cf.wy_inverse, 0),
                "fwd": (cf.fwd, cf.fwd_block_v), "fwd_from_t": (cf.fwd, cf.fwd_block_v), "wy_apply": (cf.wy_apply, 0),
                "states": (cf.states, cf.fwd_block_v), "state_grads": (cf.state_grads, cf.bwd_block_v),
                "dqkw": (cf.dqkw, cf.dqkw_block_v), "wy_bwd": (cf.wy_bwd, cf.wy_bwd_block_v)}
    inverse = "_doubling" if cf.doubling_inverse else ""
    forward = [f"wy_inverse{inverse}", "fwd_from_t"] if cf.fold_wu else [f"wy{inverse}", "fwd"]
    passes = [("fwd", name) for name in forward] + [("bwd", name) for name in
                                                    ("wy_apply", "states", "state_grads", "dqkw", "wy_bwd")]
    ours = {f"{stage}: {KERNEL_LABELS[name]}": functools.partial(kernels[name], *launches[name])
            for stage, name in passes}
    rows = []

    def record(impl, name, fn, sync):
        ms = pipelined_ms(fn, sync=sync, calls=calls)
        rows.append(dict(shape=shape, impl=impl, kernel=name, ms=ms))
        print(f"breakdown {shape} {impl:6s} {name:28s} {ms:.3f} ms", flush=True)

    for name, fn in ours.items():
        record("pallas", name, fn, jax.block_until_ready)
    fla = load_fla() if with_fla else None
    if fla is None:
        return rows
    torch = fla[0]
    from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_bwd_dhu, chunk_gated_delta_rule_fwd_h
    from fla.ops.common.chunk_o import chunk_bwd_dqkwg, chunk_bwd_dv_local, chunk_fwd_o
    from fla.ops.delta_rule.wy_fast import prepare_wy_repr_bwd, prepare_wy_repr_fwd, recompute_w_u_fwd

    tq, tk, tv, tb, th0, tdo = (torch.from_numpy(x).cuda() for x in np_in)
    tq, tk, tv, tdo, tb = (x.to(torch.bfloat16) for x in (tq, tk, tv, tdo, tb))
    scale = D ** -0.5
    with torch.no_grad():
        tw, tu, ta = prepare_wy_repr_fwd(k=tk, v=tv, beta=tb, cu_seqlens=None)
        th, tvn, _ = chunk_gated_delta_rule_fwd_h(k=tk, w=tw, u=tu, initial_state=th0, output_final_state=True)
        tdv = chunk_bwd_dv_local(q=tq, k=tk, do=tdo, scale=scale)
        tdh, _, tdv2 = chunk_gated_delta_rule_bwd_dhu(q=tq, k=tk, w=tw, do=tdo, dv=tdv, h0=th0, scale=scale)
        _, tdk, tdw = chunk_bwd_dqkwg(q=tq, k=tk, v=tvn, do=tdo, h=th, dh=tdh, w=tw, dv=tdv2, scale=scale)[:3]
        theirs = {
            "fwd: prepare_wy_repr_fwd": lambda: prepare_wy_repr_fwd(k=tk, v=tv, beta=tb, cu_seqlens=None),
            "fwd: fwd_h": lambda: chunk_gated_delta_rule_fwd_h(k=tk, w=tw, u=tu, initial_state=th0,
                                                              output_final_state=True),
            "fwd: fwd_o": lambda: chunk_fwd_o(q=tq, k=tk, v=tvn, h=th, scale=scale),
            "bwd: recompute_w_u": lambda: recompute_w_u_fwd(k=tk, v=tv, beta=tb, A=ta, cu_seqlens=None),
            "bwd: fwd_h": lambda: chunk_gated_delta_rule_fwd_h(k=tk, w=tw, u=tu, initial_state=th0),
            "bwd: dv_local": lambda: chunk_bwd_dv_local(q=tq, k=tk, do=tdo, scale=scale),
            "bwd: bwd_dhu": lambda: chunk_gated_delta_rule_bwd_dhu(q=tq, k=tk, w=tw, do=tdo, dv=tdv, h0=th0,
                                                                   scale=scale),
            "bwd: dqkwg": lambda: chunk_bwd_dqkwg(q=tq, k=tk, v=tvn, do=tdo, h=th, dh=tdh, w=tw, dv=tdv2,
                                                  scale=scale),
            "bwd: prepare_wy_repr_bwd": lambda: prepare_wy_repr_bwd(k=tk, v=tv, beta=tb, A=ta, dw=tdw, du=tdv2,
                                                                    cu_seqlens=None),
            "bwd: dk add": lambda: tdk.add(tdk),
        }
        for name, fn in theirs.items():
            record("fla", name, fn, lambda _: torch.cuda.synchronize())
    return rows


DECODE_SHAPES = [(1, 16, 128, 128), (32, 16, 128, 128)]  # B, H, K, V (DeltaNet 1.3B heads)
DECODE_STEPS = 256


def decode_us(impl: str, shape, steps: int, reps: int) -> float:
    """Microseconds per `delta_rule_step` (qk_l2norm, bf16 q/k/v) inside one jitted loop of
    `steps` tokens, the state carried as a decoding loop carries it."""
    from deltanet_jax.ops import delta_rule_step

    B, H, K, V = shape
    rng = np.random.default_rng(1)
    q, k = (jnp.asarray(rng.standard_normal((steps, B, H, K)), jnp.bfloat16) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((steps, B, H, V)), jnp.bfloat16)
    beta = jax.nn.sigmoid(jnp.asarray(rng.standard_normal((steps, B, H)), jnp.float32))

    @jax.jit
    def run(q, k, v, beta):
        def body(i, carry):
            state, acc = carry
            o, state = delta_rule_step(q[i], k[i], v[i], beta[i], state, qk_l2norm=True, implementation=impl)
            return state, acc + o.astype(jnp.float32)
        init = (jnp.zeros((B, H, K, V), jnp.float32), jnp.zeros((B, H, V), jnp.float32))
        return jax.lax.fori_loop(0, steps, body, init)

    return median_ms(lambda: run(q, k, v, beta), reps=reps) * 1e3 / steps


def parse_shapes(text: str) -> list:
    try:
        shapes = [tuple(int(n) for n in part.split("x")) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"shapes must look like 8x2048x16x128[,...]; got {text!r}")
    if any(len(sh) != 4 or min(sh) < 1 for sh in shapes):
        raise argparse.ArgumentTypeError(f"each shape needs four positive sizes B x T x H x D; got {text!r}")
    return shapes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions per measurement (median)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, no fla, no BENCHMARKS.md")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    ap.add_argument("--sweep", nargs="*", metavar="KERNEL", choices=sorted(SWEEPS),
                    help=f"first time launch choices of these kernels at every shape (all if none named): {', '.join(SWEEPS)}")
    ap.add_argument("--breakdown", action="store_true",
                    help="first time each kernel of the forward and backward alone, ours and fla's, at every shape")
    ap.add_argument("--json", help="also write the raw results to this JSON file")
    ap.add_argument("--shapes", type=parse_shapes, help="comma-separated BxTxHxD shapes instead of the standard"
                    " four, e.g. 8x2048x16x128,2x8192x16x128")
    ap.add_argument("--config", nargs="+", default=[], metavar="FIELD=VALUE",
                    help="KernelConfig overrides for the Pallas timings of the table and --breakdown (--sweep"
                         " tries its own launches), e.g. fold_wu=false wy=8,1 (launches as WARPS,STAGES)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                    help="input dtype of --sweep and --breakdown (the table is bf16, as the protocol asks:"
                         " other dtypes need --skip-table)")
    ap.add_argument("--no-fla", action="store_true", help="leave fla out even when it is importable")
    ap.add_argument("--skip-table", action="store_true", help="only the sweep and the breakdown, no end-to-end table")
    ap.add_argument("--skip-memory", action="store_true", help="skip the peak-memory comparison")
    ap.add_argument("--skip-decode", action="store_true", help="skip the decoding-step comparison")
    ap.add_argument("--from-json", nargs="+", metavar="JSON",
                    help="run nothing: write one table of the rows saved by earlier --json runs on one GPU (each"
                         " row keeps the fla figures of its own run; a later file's row for a shape replaces an"
                         " earlier one's)")
    args = ap.parse_args(argv)
    if args.from_json:
        try:
            merged = merge_saved(args.from_json)
        except (OSError, ValueError) as err:
            ap.error(f"--from-json: {err}")
        table = render(merged)
        print(table)
        if not args.no_write:
            print("wrote", update_section("ops", table))
        return merged
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    if args.dtype != "bfloat16" and not args.skip_table:
        ap.error(f"--dtype {args.dtype} applies to --sweep and --breakdown only; add --skip-table")
    dtype = jnp.dtype(args.dtype)
    try:
        overrides = parse_config(args.config)
    except argparse.ArgumentTypeError as err:
        ap.error(str(err))
    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not args.quick:
        ap.error("the op benchmark needs a GPU (use --quick for a smoke test on this backend)")
    gpu = jax.devices()[0].device_kind
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    write = not (args.quick or args.no_write or args.skip_table)
    fla = None if args.quick or args.no_fla else load_fla()
    results = dict(gpu=gpu, jax=jax.__version__, date=datetime.date.today().isoformat(), rows=[], dtype=args.dtype,
                   command="python -m experiments.bench_ops" + "".join(" " + a for a in (argv or sys.argv[1:])),
                   fla=None if fla is None else fla[2])
    if args.sweep is not None:
        results["sweep"] = [row for shape in shapes
                            for row in sweep(shape, args.reps, args.sweep or list(SWEEPS), dtype)]
        save(results, args.json)
    if args.breakdown:
        results["breakdown"] = [row for shape in shapes
                                for row in breakdown(shape, with_fla=fla is not None and dtype == jnp.bfloat16,
                                                     overrides=overrides, dtype=dtype)]
        save(results, args.json)
    for shape in ([] if args.skip_table else shapes):
        np_in = make_inputs(shape)
        arrays = jax_inputs(np_in)
        row = dict(shape=shape)
        times, o_pl = bench_jax("pallas", arrays, args.reps, pallas_config(shape, overrides), back_to_back=True)
        row.update({f"pallas_{key}": ms for key, ms in times.items()})
        times, o_x = bench_jax("chunked", arrays, args.reps)
        row.update({f"xla_{key}": ms for key, ms in times.items()})
        row["err_pallas_vs_xla"] = float(np.linalg.norm(o_pl - o_x) / np.linalg.norm(o_x))
        if fla is not None:
            times, o_f, _ = bench_fla(fla, np_in, args.reps, back_to_back=True)
            row.update({f"fla_{key}": ms for key, ms in times.items()})
            row["err_pallas_vs_fla"] = float(np.linalg.norm(o_pl - o_f) / np.linalg.norm(o_f))
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        save(results, args.json)   # after every shape, so an interrupted run still leaves its measured rows
        if write:
            update_section("ops", render(results))
    if not args.skip_decode:
        for shape in (DECODE_SHAPES[:1] if args.quick else DECODE_SHAPES):
            steps = 8 if args.quick else DECODE_STEPS
            row = dict(shape=shape, steps=steps, xla_us=decode_us("xla", shape, steps, args.reps),
                       pallas_us=decode_us("pallas", shape, steps, args.reps))
            results.setdefault("decode", []).append(row)
            print(json.dumps(row), flush=True)
            save(results, args.json)
    if not args.quick and not args.skip_memory:
        mem = dict(shape=MEMORY_SHAPE)
        np_in = make_inputs(MEMORY_SHAPE)
        mem["pallas_gib"] = jax_peak_gib("pallas", jax_inputs(np_in))
        if fla is not None:
            mem["fla_gib"] = bench_fla(fla, np_in, 1, peak=True)[2]
        results["memory"] = mem
    table = render(results)
    print(table)
    save(results, args.json)
    if write:
        print("wrote", update_section("ops", table))
    return results


def save(results: dict, path: str | None) -> None:
    """Write `results` as JSON to `path` (if given), whole, replacing what an earlier call wrote
    only once the new file is complete (a run killed mid-write keeps the previous one)."""
    if path:
        with open(path + ".part", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(path + ".part", path)


def merge_saved(paths: list) -> dict:
    """One results dict from the `--json` files of several runs on one GPU: rows by shape (a later
    file's row replaces an earlier one's), the decoding and memory rows of the last file that has
    them, every run's command and date."""
    runs = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        missing = [key for key in ("gpu", "jax", "date", "command", "rows") if key not in data]
        if missing:
            raise ValueError(f"{path} is not a bench_ops --json file (no {', '.join(missing)})")
        runs.append(data)
    gpus = sorted({r["gpu"] for r in runs})
    if len(gpus) > 1:
        raise ValueError(f"the files were measured on different GPUs ({', '.join(gpus)}): one table holds one GPU")
    rows = {}
    for run in runs:
        for row in run["rows"]:
            rows[tuple(row["shape"])] = row
    merged = dict(gpu=gpus[0], jax=", ".join(dict.fromkeys(r["jax"] for r in runs)),
                  date=", ".join(dict.fromkeys(r["date"] for r in runs)),
                  command="; ".join(r["command"] for r in runs),
                  fla=", ".join(dict.fromkeys(str(r["fla"]) for r in runs if r.get("fla"))) or None,
                  rows=sorted(rows.values(), key=lambda r: [SHAPES.index(tuple(r["shape"])) if tuple(r["shape"]) in SHAPES
                                                            else len(SHAPES), r["shape"]]))
    for key in ("decode", "memory", "breakdown"):
        for run in runs:
            if run.get(key):
                merged[key] = run[key]
    return merged


def render(res) -> str:
    has_fla = any("fla_fwd" in r for r in res["rows"])
    lines = [f"## Delta-rule ops ({res['gpu']}, {res['date']})", "",
             f"`{res['command']}` — jax {res['jax']}"
             + (f", fla {res.get('fla')}" if has_fla else ", fla not importable in this run")
             + "; bf16 inputs, with an initial state; forward+backward = gradients of q, k, v, beta and"
             " the initial state. Milliseconds, median of the timed repetitions after warm-up;"
             " speed-up = fla time / Pallas time (> 1 means faster than fla).", ""]
    head = "| B, T, H, D | Pallas fwd | fla fwd | XLA fwd | fwd speed-up vs fla | Pallas fwd+bwd | fla fwd+bwd | XLA fwd+bwd | fwd+bwd speed-up vs fla | rel. err vs fla |"
    lines += [head, "|---" * 10 + "|"]
    for r in res["rows"]:
        f = lambda key: f"{r[key]:.3f}" if key in r else "—"
        ratio = lambda a, b: f"{r[a] / r[b]:.2f}×" if a in r else "—"
        err = f"{r['err_pallas_vs_fla']:.4f}" if "err_pallas_vs_fla" in r else "—"
        lines.append(f"| {', '.join(map(str, r['shape']))} | {f('pallas_fwd')} | {f('fla_fwd')} | {f('xla_fwd')} | "
                     f"{ratio('fla_fwd', 'pallas_fwd')} | {f('pallas_fwdbwd')} | {f('fla_fwdbwd')} | "
                     f"{f('xla_fwdbwd')} | {ratio('fla_fwdbwd', 'pallas_fwdbwd')} | {err} |")
    if any("pallas_fwd_b2b" in r for r in res["rows"]):
        lines += ["", "Device time per call: rounds of 20 back-to-back calls, one barrier after the last (median round,"
                      " `timing.pipelined_ms`),"
                      " so each framework's host overhead per call overlaps the device's work, as inside a training"
                      " step. Milliseconds; speed-up = fla / Pallas.", "",
                  "| B, T, H, D | Pallas fwd | fla fwd | fwd speed-up | Pallas fwd+bwd | fla fwd+bwd | fwd+bwd speed-up |",
                  "|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            f = lambda key: f"{r[key]:.3f}" if key in r else "—"
            ratio = lambda a, b: f"{r[a] / r[b]:.2f}×" if a in r and b in r else "—"
            lines.append(f"| {', '.join(map(str, r['shape']))} | {f('pallas_fwd_b2b')} | {f('fla_fwd_b2b')} | "
                         f"{ratio('fla_fwd_b2b', 'pallas_fwd_b2b')} | {f('pallas_fwdbwd_b2b')} | "
                         f"{f('fla_fwdbwd_b2b')} | {ratio('fla_fwdbwd_b2b', 'pallas_fwdbwd_b2b')} |")
    if "memory" in res:
        m = res["memory"]
        fla_mem = f"{m['fla_gib']:.2f} GiB" if m.get("fla_gib") is not None else "—"
        lines += ["", f"Peak memory of forward+backward at {tuple(m['shape'])} (inputs included): "
                      f"Pallas {m['pallas_gib']:.2f} GiB (compiled arguments + outputs + temporaries), "
                      f"fla {fla_mem} (torch max allocated)."]
    if res.get("breakdown"):
        lines += ["", "Each kernel alone (`--breakdown`): device ms per call from back-to-back calls, the launch"
                      " choices the op uses; fla's kernels as its `chunk_delta_rule` calls them.", "",
                  "| B, T, H, D | impl | forward kernels | fwd sum | backward kernels | bwd sum |",
                  "|---|---|---|---|---|---|"]
        for shape in dict.fromkeys(tuple(r["shape"]) for r in res["breakdown"]):
            for impl in dict.fromkeys(r["impl"] for r in res["breakdown"]):
                parts = {}
                for r in res["breakdown"]:
                    if tuple(r["shape"]) == shape and r["impl"] == impl:
                        stage, name = r["kernel"].split(": ", 1)
                        parts.setdefault(stage, []).append((name, r["ms"]))
                if not parts:
                    continue
                cell = lambda st: " · ".join(f"{n} {ms:.3f}" for n, ms in parts.get(st, []))
                total = lambda st: f"{sum(ms for _, ms in parts.get(st, [])):.3f}"
                lines.append(f"| {', '.join(map(str, shape))} | {impl} | {cell('fwd')} | {total('fwd')} | "
                             f"{cell('bwd')} | {total('bwd')} |")
    if res.get("decode"):
        lines += ["", "Decoding step (`delta_rule_step` with qk_l2norm, bf16 q/k/v, float32 state), microseconds"
                      " per token inside one jitted loop:", "",
                  "| B, H, K, V | fused XLA | Pallas kernel | faster |", "|---|---|---|---|"]
        for r in res["decode"]:
            best = "XLA" if r["xla_us"] <= r["pallas_us"] else "Pallas"
            lines.append(f"| {', '.join(map(str, r['shape']))} | {r['xla_us']:.2f} | {r['pallas_us']:.2f} | {best} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
