"""`python -m experiments.bench_train --quick --no-write`: the training benchmark end to end on a tiny
model (no fla, any backend), BENCHMARKS.md left alone."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quick_bench_train_prints_a_table_and_writes_nothing(tmp_path):
    before = (ROOT / "BENCHMARKS.md").read_text() if (ROOT / "BENCHMARKS.md").exists() else None
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    out = subprocess.run([sys.executable, "-m", "experiments.bench_train", "--quick", "--no-write",
                          "--json", str(tmp_path / "run.json")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    row = next(line for line in out.stdout.splitlines() if "| deltanet-jax |" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0].startswith("tiny (") and cells[2] == "1"
    assert float(cells[4]) > 0 and re.fullmatch(r"[\d,]+", cells[5]) and int(cells[5].replace(",", "")) > 0
    assert float(cells[7]) > 0 and int(cells[8].replace(",", "")) > 0  # back to back: step ms, tokens/s
    assert "fla" not in out.stdout.split("|---|")[-1].replace("vs fla", "")
    after = (ROOT / "BENCHMARKS.md").read_text() if (ROOT / "BENCHMARKS.md").exists() else None
    assert after == before
    assert "first step done (compilation included)" in out.stderr  # the worker's progress, echoed live
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved["command"].endswith("--quick --no-write --json " + str(tmp_path / "run.json"))
    assert [r["label"] for r in saved["rows"]] == ["deltanet-jax"] and saved["scaled"] == []


def _saved(command, rows=(), scaled=(), size="340m", layout="data"):
    return dict(command=command, batch=8, seq=2048, size=size, layout=layout, rows=list(rows), scaled=list(scaled))


def _row(size, impl, tokens_per_s, **extra):
    return dict(size=size, impl=impl, label="fla" if impl == "fla" else "deltanet-jax", devices=1, param_dtype="bfloat16",
                step_ms=8 * 2048 / tokens_per_s * 1e3, tokens_per_s=tokens_per_s, peak_gib=10.0, mfu=None,
                params=374_000_000, device="GPU", **extra)


def test_saved_runs_merge_into_one_table(tmp_path, capsys):
    """Parts of one comparison run apart (--json) are written as one table (--from-json): ratios against
    the fla row of the same size, scaling efficiency against the 1-device row of another file."""
    from experiments import bench_train

    a, b, c, d = (tmp_path / f"{n}.json" for n in "abcd")
    a.write_text(json.dumps(_saved("A", [_row("340m", "ours", 100_000.0), _row("340m", "fla", 80_000.0)])))
    b.write_text(json.dumps(_saved("B", [_row("1.3b", "ours", 50_000.0, back_to_back_ms=273.1,
                                              back_to_back_tokens_per_s=60_000.0),
                                         _row("1.3b", "fla", 40_000.0, back_to_back_ms=409.6,
                                              back_to_back_tokens_per_s=40_000.0)])))
    one = dict(_row("340m", "ours", 100_000.0), devices_asked=1, mesh=[1, 1, 1], rows=8, grad_accum=1)
    two = dict(_row("340m", "ours", 190_000.0), devices_asked=2, devices=2, mesh=[2, 1, 1], rows=16, grad_accum=1)
    c.write_text(json.dumps(_saved("C", scaled=[two])))
    d.write_text(json.dumps(_saved("D", scaled=[one])))
    rows = bench_train.write_saved([str(p) for p in (a, b, c, d)], write=False)
    out = capsys.readouterr().out
    assert len(rows) == 6 and "`A; B`" in out and "`C; D`" in out
    assert out.count("| 1.25x |") == 2  # each size against its own fla row
    assert out.count("| 1.50x |") == 1 and "| 273.1 | 60,000 | 1.50x |" in out  # back to back, where measured
    scaling = out.split("## Scaling")[1]
    assert scaling.index("| 1 |") < scaling.index("| 2 |") and "| 95% |" in scaling
    (tmp_path / "bad.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="not a bench_train --json file"):
        bench_train.write_saved([str(tmp_path / "bad.json")], write=False)
    e = tmp_path / "e.json"
    e.write_text(json.dumps(dict(_saved("E", [_row("340m", "ours", 1.0)]), batch=4)))
    with pytest.raises(ValueError, match="different batch shapes"):
        bench_train.write_saved([str(a), str(e)], write=False)


def test_a_worker_past_its_timeout_is_stopped_and_reported(monkeypatch):
    from experiments import bench_train

    monkeypatch.chdir(ROOT)
    result = bench_train._spawn(["--worker", "ours", "--preset", "tiny-shakespeare", "--batch", "2", "--seq", "64"],
                                timeout=1)
    assert "timed out after 1 s" in result["error"]


def test_plan_scaling_meshes_and_accumulation():
    from experiments.bench_train import plan_scaling

    plan = plan_scaling([1, 2, 4, 8], "fsdp-tp", 2, 8, 256)
    assert plan == [(1, (1, 1, 1), 256, 32), (2, (1, 1, 2), 256, 32), (4, (1, 2, 2), 256, 16),
                    (8, (1, 4, 2), 256, 8)]
    assert plan_scaling([4], "fsdp", 2, 8, None) == [(4, (1, 4, 1), 32, 1)]
    assert plan_scaling([2], "data", 2, 3, 12) == [(2, (2, 1, 1), 12, 2)]
    for counts, layout, global_batch, match in (([3], "fsdp-tp", None, "tensor groups of 2"),
                                                ([4], "fsdp", 20, "not a multiple of 32")):
        with pytest.raises(ValueError, match=match):
            plan_scaling(counts, layout, 2, 8, global_batch)


def test_quick_scaling_run_with_tensor_parallelism():
    """Two host devices, FSDP x 2-way tensor parallel, 4 sequences per step in 2 micro-batches."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0 "
                         "--xla_llvm_disable_expensive_passes=true")
    out = subprocess.run([sys.executable, "-m", "experiments.bench_train", "--quick", "--no-write", "--skip-compare",
                          "--scaling", "2", "--layout", "fsdp-tp", "--global-batch", "4"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    row = next(line for line in out.stdout.splitlines() if line.startswith("| 2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == ["1, 1, 2", "4", "2"] and float(cells[4]) > 0


def test_kernel_summary_groups_by_name_and_kind(capsys):
    from experiments.bench_train import kernel_kind, print_profile, summarize_kernels

    assert kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert kernel_kind("nvjet_sm90_tst_128x160_64x5_1x2_h_bz_NNT") == "matmul"  # cuBLAS on Hopper
    assert kernel_kind("delta_rule_chunk_fwd_from_t") == "delta rule"
    assert kernel_kind("loop_add_fusion_12") == "other"
    kernels = [("delta_rule_chunk_fwd", 300.0), ("gemm_a", 1000.0), ("gemm_a", 1000.0), ("fusion_1", 60.0)] * 2
    summary = summarize_kernels(kernels, steps=2, top=2)
    assert summary["device_ms_per_step"] == pytest.approx(2.36)
    assert summary["by_kind"] == pytest.approx({"delta rule": 0.3, "matmul": 2.0, "other": 0.06})
    assert [r["name"] for r in summary["top"]] == ["gemm_a", "delta_rule_chunk_fwd"]
    assert summary["top"][0]["launches_per_step"] == 2
    print_profile("x", summary)
    err = capsys.readouterr().err
    assert "2.4 device ms per step (matmul 2.0, delta rule 0.3, other 0.1)" in err and "gemm_a" in err


def test_quick_bench_train_profile_on_a_backend_without_device_timeline(capsys):
    """--profile traces extra steps after timing; the CPU's trace has no device kernels, which the
    summary says instead of inventing numbers."""
    from experiments import bench_train

    rows = bench_train.main(["--quick", "--no-write", "--profile", "1"])
    assert rows[0]["profile"]["steps"] == 1 and rows[0]["profile"]["top"] == []
    assert "no device kernels in the trace" in capsys.readouterr().err
