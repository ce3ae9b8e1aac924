"""Registers, spills and shared memory of the Pallas delta-rule kernels, on any machine: lowers the op
for CUDA (no GPU needed), writes each kernel's Triton IR, and, where the `triton` package is
importable, compiles it for sm_90a with that package and reads the resource usage off the binary.

    python -m experiments.kernel_resources --shape 8x2048x16x128 [--backward] [--config fold_wu=false]

The compile goes through upstream Triton, not the Triton inside jaxlib that builds the kernels on a
GPU, so its figures are close estimates: they say which kernel spills, how many programs fit on an
SM, and what a change does to either, before any GPU time is spent. Writes `NN_<kernel>.ttir`
(and `.ttgir`, `.ptx`, `.cubin` when compiled) under `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

from experiments.bench_ops import parse_config, parse_shapes

SM_REGISTERS = 65536   # 32-bit registers per SM on Hopper
SM_SHARED = 228 * 1024


def lower_kernels(fn, *args) -> list[dict]:
    """The Triton modules of every `pallas_call` in `jax.jit(fn)` lowered for CUDA on `args` (shape
    structs): dicts of name, Triton IR text, num_warps, num_stages and grid. Hooks the Triton
    backend's lowering for the duration of the call and puts it back."""
    from jax._src.pallas import core as pallas_core
    from jax._src.pallas.triton import pallas_call_registration as registration

    found, launch = [], [(4, 3)]
    lower_module = registration.lowering.lower_jaxpr_to_triton_module
    lower_call = registration.pallas_call_lowering

    def module_hook(jaxpr, grid_mapping, *a, **k):
        res = lower_module(jaxpr, grid_mapping, *a, **k)
        found.append(dict(name=jaxpr.debug_info.func_name, ir=res.module.operation.get_asm(enable_debug_info=False),
                          num_warps=launch[0][0], num_stages=launch[0][1], grid=tuple(res.grid)))
        return res

    def call_hook(ctx, *a, compiler_params=None, **k):
        params = compiler_params
        launch[0] = (4, 3) if params is None else (params.num_warps or 4, params.num_stages or 3)
        return lower_call(ctx, *a, compiler_params=compiler_params, **k)

    # pallas_call's GPU rule finds the Triton lowering either as this module attribute at each
    # lowering or, in JAX versions with a registry of lowerings by compiler-parameter class, there.
    rules = getattr(pallas_core, "_backend_lowering_rules", {})
    params_cls = next((cls for cls, (rule, _) in rules.items() if rule is lower_call), None)
    registration.lowering.lower_jaxpr_to_triton_module = module_hook
    registration.pallas_call_lowering = call_hook
    if params_cls is not None:
        rules[params_cls] = (call_hook, rules[params_cls][1])
    try:
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower_module
        registration.pallas_call_lowering = lower_call
        if params_cls is not None:
            rules[params_cls] = (lower_call, rules[params_cls][1])
    return found


def compile_report(path: str, num_warps: int, num_stages: int) -> dict:
    """Compile the Triton IR at `path` for sm_90a with upstream Triton; registers per thread, stack
    (spill) bytes and shared memory per program, and the layout conversions and barriers."""
    import triton
    from triton.backends.compiler import GPUTarget

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
    base = os.path.splitext(path)[0]
    for ext in ("ttgir", "ptx"):
        with open(f"{base}.{ext}", "w") as f:
            f.write(kernel.asm[ext])
    with open(f"{base}.cubin", "wb") as f:
        f.write(kernel.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = subprocess.run([tool, "-res-usage", f"{base}.cubin"], capture_output=True, text=True, check=True).stdout
    regs, stack = (int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK"))
    shared = int(kernel.metadata.shared)
    threads = 32 * num_warps
    fit = min(SM_REGISTERS // (max(regs, 1) * threads), SM_SHARED // max(shared, 1) if shared else 32)
    return dict(registers=regs, stack_bytes=stack, shared_bytes=shared, programs_per_sm=fit,
                layout_conversions=kernel.asm["ttgir"].count("convert_layout"),
                barriers=kernel.asm["ptx"].count("bar.sync"))


def op_kernels(shape, backward: bool, overrides: dict, dtype=jnp.bfloat16) -> list[dict]:
    """The kernels of the Pallas op (forward, or forward+backward) at `shape` (B, T, H, D)."""
    from pallas_kernels.delta_rule import chunk_delta_rule
    from pallas_kernels.delta_rule.common import KernelConfig

    B, T, H, D = shape
    config = dataclasses.replace(KernelConfig.for_shape(D, D, B * H, jnp.dtype(dtype).itemsize), **overrides)
    x = jax.ShapeDtypeStruct((B, T, H, D), dtype)
    beta = jax.ShapeDtypeStruct((B, T, H), jnp.float32)
    h0 = jax.ShapeDtypeStruct((B, H, D, D), jnp.float32)

    def op(q, k, v, beta, h0):
        return chunk_delta_rule(q, k, v, beta, scale=D ** -0.5, initial_state=h0, config=config)

    if not backward:
        return lower_kernels(op, x, x, x, beta, h0)

    def fwd_bwd(q, k, v, beta, h0, do):
        o, pull = jax.vjp(lambda *a: op(*a)[0], q, k, v, beta, h0)
        return o, pull(do)
    return lower_kernels(fwd_bwd, x, x, x, beta, h0, x)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.kernel_resources", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=parse_shapes, default=[(8, 2048, 16, 128)], help="B x T x H x D (one shape)")
    ap.add_argument("--backward", action="store_true", help="the kernels of forward+backward (default: forward)")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    ap.add_argument("--config", nargs="+", default=[], metavar="FIELD=VALUE", help="KernelConfig overrides")
    ap.add_argument("--out", help="folder for the IR and binaries (default: a new temporary folder)")
    ap.add_argument("--ir-only", action="store_true", help="write the Triton IR, do not compile")
    args = ap.parse_args(argv)
    if len(args.shape) != 1:
        ap.error("--shape takes one B x T x H x D shape")
    try:
        overrides = parse_config(args.config)
    except argparse.ArgumentTypeError as err:
        ap.error(str(err))
    compile_ok = not args.ir_only
    if compile_ok:
        try:
            import triton  # noqa: F401
        except ImportError:
            print("the `triton` package is not importable here: writing the Triton IR only "
                  "(pip install triton in any environment to compile)", file=sys.stderr)
            compile_ok = False
    out = args.out or tempfile.mkdtemp(prefix="kernel_resources_")
    os.makedirs(out, exist_ok=True)
    kernels = op_kernels(args.shape[0], args.backward, overrides, jnp.dtype(args.dtype))
    passes = "forward+backward" if args.backward else "forward"
    print(f"{len(kernels)} kernels at {args.shape[0]} ({args.dtype}, {passes}), files in {out}")
    for i, kern in enumerate(kernels):
        path = os.path.join(out, f"{i:02d}_{kern['name']}.ttir")
        with open(path, "w") as f:
            f.write(kern["ir"])
        line = f"{kern['name']:32s} warps {kern['num_warps']} stages {kern['num_stages']} grid {kern['grid']}"
        if compile_ok:
            r = compile_report(path, kern["num_warps"], kern["num_stages"])
            line += (f": {r['registers']:3d} registers, {r['stack_bytes']:4d} B stack,"
                     f" {r['shared_bytes'] // 1024:3d} KiB shared, {r['programs_per_sm']} programs/SM,"
                     f" {r['layout_conversions']} layout conversions, {r['barriers']} barriers")
        print(line, flush=True)


if __name__ == "__main__":
    main()
