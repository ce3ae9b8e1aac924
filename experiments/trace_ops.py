"""Where the time of one delta-rule call goes: a profiler timeline of the Pallas forward and
forward+backward at one shape, read back from the trace and printed call by call (each device
kernel's start offset from the host call, its duration, and the gaps), so launch latency and gaps
between kernels show up next to the kernels themselves.

    python -m experiments.trace_ops --shape 2x8192x16x128
    python -m experiments.trace_ops --shape 2x8192x16x128 --config fold_wu=false --out /tmp/trace

The trace (TensorBoard / Perfetto format) stays in --out. On a backend without a device timeline
(CPU) only the host-side call times are printed.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import sys
import tempfile
import time

import jax

from experiments.bench_ops import jax_fns, jax_inputs, make_inputs, pallas_config, parse_config, parse_shapes

CALL_PREFIX = "trace_ops:"
HOST_SPANS = 12  # host-side spans listed per call


def load_trace(log_dir: str) -> list[dict]:
    """The complete ('X') events of the newest Perfetto trace under `log_dir`, each with the names of
    its process and thread added as `process` and `thread`."""
    paths = sorted(glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "perfetto_trace.json.gz")))
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {log_dir}/plugins/profile")
    with gzip.open(paths[-1], "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    meta = [e for e in events if e.get("ph") == "M"]
    process = {e["pid"]: e["args"]["name"] for e in meta if e.get("name") == "process_name"}
    thread = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e.get("name") == "thread_name"}
    return [dict(e, process=process.get(e.get("pid"), "?"), thread=thread.get((e.get("pid"), e.get("tid")), "?"))
            for e in events if e.get("ph") == "X"]


def device_events(events: list[dict]) -> list[dict]:
    """The events of `load_trace` that ran on a device (kernels, copies), not on the host."""
    return [e for e in events if "/device:" in e["process"] and "/host" not in e["process"]]


def calls_and_kernels(events: list[dict]) -> list[dict]:
    """Per host call (annotated `trace_ops:<label>`): its wall time, and the device events and the
    host-side spans (runtime, not Python frames) that start inside it, as offsets from the call's
    start (microseconds)."""
    device = device_events(events)
    host = [e for e in events if "/host" in e["process"] and not e["name"].startswith(("$", CALL_PREFIX))]
    out = []
    for call in sorted((e for e in events if e["name"].startswith(CALL_PREFIX)), key=lambda e: e["ts"]):
        t0, t1 = call["ts"], call["ts"] + call["dur"]
        span = lambda evs: [dict(name=e["name"], thread=e.get("thread", "?"), start_us=e["ts"] - t0,  # noqa: E731
                                 dur_us=e.get("dur", 0.0)) for e in sorted(evs, key=lambda e: e["ts"])]
        out.append(dict(label=call["name"][len(CALL_PREFIX):], wall_us=call["dur"],
                        kernels=span(e for e in device if t0 <= e["ts"] < t1),
                        host=span(e for e in host if t0 <= e["ts"] < t1)))
    return out


def describe(call: dict) -> str:
    """Text table of one call: each device event's start, duration and the gap before it on its
    device thread (stream, or the XLA op / module spans); then the sums over the busiest thread."""
    lines = [f"{call['label']}: host wall {call['wall_us']:.1f} us"]
    threads = {}
    for k in call["kernels"]:
        threads.setdefault(k["thread"], []).append(k)
    for name, kernels in threads.items():
        lines.append(f"  [{name}]")
        end = 0.0
        for k in kernels:
            gap = k["start_us"] - end
            lines.append(f"  +{k['start_us']:9.1f} us  {k['dur_us']:8.1f} us  (gap {gap:7.1f})  {k['name'][:80]}")
            end = max(end, k["start_us"] + k["dur_us"])
    if call["kernels"]:
        stream = max(threads.values(), key=len)         # the thread with the most events: the kernels
        busy = sum(k["dur_us"] for k in stream)
        first = stream[0]["start_us"]
        end = max(k["start_us"] + k["dur_us"] for k in stream)
        lines.append(f"  device busy {busy:.1f} us; first kernel after {first:.1f} us; last ends at {end:.1f} us;"
                     f" host returns {call['wall_us'] - end:.1f} us later")
    else:
        lines.append("  (no device events in this trace: host-only backend)")
    longest = sorted(call.get("host", []), key=lambda e: -e["dur_us"])[:HOST_SPANS]
    if longest:
        lines.append(f"  host spans (the {len(longest)} longest, in start order; Python frames left out):")
        for e in sorted(longest, key=lambda e: e["start_us"]):
            lines.append(f"  +{e['start_us']:9.1f} us  {e['dur_us']:8.1f} us  [{e['thread'][:24]}]  {e['name'][:70]}")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=parse_shapes, default=parse_shapes("2x8192x16x128"),
                    help="one BxTxHxD shape (default: 2x8192x16x128)")
    ap.add_argument("--config", nargs="+", default=[], metavar="FIELD=VALUE", help="KernelConfig overrides")
    ap.add_argument("--calls", type=int, default=3, help="traced calls of each pass (default: %(default)s)")
    ap.add_argument("--out", help="trace directory (default: a new temporary one)")
    args = ap.parse_args(argv)
    if len(args.shape) != 1:
        ap.error("--shape takes one shape")
    if args.calls < 1:
        ap.error("--calls must be >= 1")
    try:
        overrides = parse_config(args.config)
    except argparse.ArgumentTypeError as err:
        ap.error(str(err))
    shape = args.shape[0]
    q, k, v, beta, h0, do = jax_inputs(make_inputs(shape))
    fwd, fwd_bwd = jax_fns("pallas", pallas_config(shape, overrides))
    passes = {"forward": lambda: fwd(q, k, v, beta, h0), "forward+backward": lambda: fwd_bwd(q, k, v, beta, h0, do)}
    for fn in passes.values():     # compile and warm up outside the trace
        jax.block_until_ready(fn())
        jax.block_until_ready(fn())
    log_dir = args.out or tempfile.mkdtemp(prefix="trace_ops_")
    host_ms = {}
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        for name, fn in passes.items():
            for i in range(args.calls):
                t = time.perf_counter()
                with jax.profiler.TraceAnnotation(f"{CALL_PREFIX}{name} #{i + 1}"):
                    jax.block_until_ready(fn())
                host_ms.setdefault(name, []).append((time.perf_counter() - t) * 1e3)
    calls = calls_and_kernels(load_trace(log_dir))
    print(f"{jax.devices()[0].device_kind}, shape {shape}, config overrides {overrides or 'none'}; trace in {log_dir}")
    for call in calls:
        print(describe(call))
    for name, ms in host_ms.items():
        print(f"{name}: host-timed calls {', '.join(f'{x:.3f}' for x in ms)} ms")
    return calls


if __name__ == "__main__":
    main()
    sys.exit(0)
