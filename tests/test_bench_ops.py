"""`experiments.bench_ops` on CPU: the quick smoke run end to end, `--config` parsing, rendering."""

import argparse
import json

import numpy as np
import pytest

from experiments import bench_ops
from pallas_kernels.delta_rule.common import Launch


@pytest.mark.parametrize("doubling", [False, True])
def test_quick_run_with_breakdown(tmp_path, doubling):
    out = tmp_path / "ops.json"
    bench_ops.main(["--quick", "--no-write", "--breakdown", "--skip-decode", "--reps", "1",
                    "--config", "fold_wu=false", f"doubling_inverse={str(doubling).lower()}", "--json", str(out)])
    res = json.loads(out.read_text())
    (row,) = res["rows"]
    assert row["pallas_fwd"] > 0 and row["pallas_fwdbwd"] > 0 and row["err_pallas_vs_xla"] < 0.02
    assert row["pallas_fwd_b2b"] > 0 and row["pallas_fwdbwd_b2b"] > 0 and "xla_fwd_b2b" not in row
    kernels = [r["kernel"] for r in res["breakdown"] if r["impl"] == "pallas"]
    prepare = "fwd: wy_prepare (+T, doubling)" if doubling else "fwd: wy_prepare (+T)"
    assert kernels[:2] == [prepare, "fwd: chunk_forward"]   # the forward without folding
    assert len(kernels) == 7 and all(r["ms"] > 0 for r in res["breakdown"])


def test_float32_sweep_and_dtype_needs_skip_table(tmp_path, monkeypatch, capsys):
    """`--dtype` times the kernels alone on float32 inputs (their setup at the op's float32 launch
    choices); the end-to-end table stays bf16, so another dtype without --skip-table is refused."""
    with pytest.raises(SystemExit):
        bench_ops.main(["--quick", "--dtype", "float32"])
    assert "add --skip-table" in capsys.readouterr().err
    monkeypatch.setitem(bench_ops.SWEEPS, "wy_apply", ((0,), (4,), (1,)))
    out = tmp_path / "sweep.json"
    bench_ops.main(["--quick", "--skip-table", "--skip-decode", "--sweep", "wy_apply", "--dtype", "float32",
                    "--reps", "1", "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["dtype"] == "float32" and res["rows"] == []
    (row,) = res["sweep"]
    assert row["kernel"] == "wy_apply" and row["num_warps"] == 4 and row["ms"] > 0


def test_sweep_times_both_diagonal_inverses(tmp_path, monkeypatch):
    """`--sweep wy_inverse wy_inverse_doubling` times the inverse kernel by substitution and by
    doubling (`KernelConfig.doubling_inverse`) in one run."""
    for name in ("wy_inverse", "wy_inverse_doubling"):
        monkeypatch.setitem(bench_ops.SWEEPS, name, ((0,), (2, 4), (1,)))
    out = tmp_path / "sweep.json"
    bench_ops.main(["--quick", "--skip-table", "--skip-decode", "--sweep", "wy_inverse", "wy_inverse_doubling",
                    "--reps", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["sweep"]
    assert [(r["kernel"], r["num_warps"]) for r in rows] == [
        ("wy_inverse", 2), ("wy_inverse", 4), ("wy_inverse_doubling", 2), ("wy_inverse_doubling", 4)]
    assert all(r["ms"] > 0 for r in rows)


def test_parse_config():
    got = bench_ops.parse_config(["fold_wu=true", "wy=8,2", "fwd_block_v=32", "doubling_inverse=1"])
    assert got == {"fold_wu": True, "wy": Launch(8, 2), "fwd_block_v": 32, "doubling_inverse": True}
    for bad in (["nope=1"], ["wy=8"], ["fold_wu=maybe"], ["fwd_block_v"]):
        with pytest.raises(argparse.ArgumentTypeError):
            bench_ops.parse_config(bad)


def test_render_breakdown_sums_per_pass():
    res = dict(gpu="X", jax="0", date="d", command="c", rows=[], breakdown=[
        dict(shape=[1, 64, 1, 16], impl="pallas", kernel="fwd: a", ms=0.5),
        dict(shape=[1, 64, 1, 16], impl="pallas", kernel="fwd: b", ms=0.25),
        dict(shape=[1, 64, 1, 16], impl="pallas", kernel="bwd: c", ms=1.0),
    ])
    text = bench_ops.render(res)
    assert "| 1, 64, 1, 16 | pallas | a 0.500 · b 0.250 | 0.750 | c 1.000 | 1.000 |" in text


def test_render_back_to_back_table():
    row = dict(shape=[1, 64, 1, 16], pallas_fwd=1.0, pallas_fwdbwd=2.0, pallas_fwd_b2b=0.5, pallas_fwdbwd_b2b=1.6,
               fla_fwd=0.9, fla_fwdbwd=2.2, fla_fwd_b2b=0.6, fla_fwdbwd_b2b=2.0)
    text = bench_ops.render(dict(gpu="X", jax="0", date="d", command="c", rows=[row]))
    assert "| 1, 64, 1, 16 | 1.000 | 0.900 | — | 0.90× |" in text   # with a barrier per call
    assert "| 1, 64, 1, 16 | 0.500 | 0.600 | 1.20× | 1.600 | 2.000 | 1.25× |" in text   # back to back


def _run(command, date, rows, **extra):
    return dict(gpu="NVIDIA H200", jax="0.11.2", fla="0.6.0", date=date, command=command, rows=rows, **extra)


def _row(shape, ours, fla):
    keys = ("fwd", "fwdbwd", "fwd_b2b", "fwdbwd_b2b")
    return dict(shape=list(shape), **{f"pallas_{k}": ours for k in keys}, **{f"fla_{k}": fla for k in keys},
                xla_fwd=9.0, xla_fwdbwd=9.0, err_pallas_vs_fla=0.006)


def test_saved_runs_merge_into_one_table(tmp_path, capsys):
    """Rows of runs cut short (--json is rewritten after every shape) are written as one table
    (--from-json): each row keeps its own run's fla figures, a later file's row for a shape replaces
    an earlier one's, rows in the standard order; files from two GPUs are refused."""
    a, b, c = (tmp_path / f"{n}.json" for n in "abc")
    a.write_text(json.dumps(_run("A", "2026-12-01", [_row((2, 8192, 16, 128), 0.5, 1.0),
                                                     _row((8, 2048, 16, 128), 9.0, 1.0)])))
    b.write_text(json.dumps(_run("B", "2026-12-02", [_row((16, 2048, 32, 64), 0.8, 1.0),
                                                     _row((8, 2048, 16, 128), 0.4, 1.0)],
                                 memory=dict(shape=[1, 32768, 16, 128], pallas_gib=2.0, fla_gib=2.5))))
    merged = bench_ops.main(["--from-json", str(a), str(b), "--no-write"])
    out = capsys.readouterr().out
    assert [tuple(r["shape"]) for r in merged["rows"]] == [(8, 2048, 16, 128), (2, 8192, 16, 128), (16, 2048, 32, 64)]
    assert "`A; B`" in out and "2026-12-01, 2026-12-02" in out and "Pallas 2.00 GiB" in out
    assert "| 8, 2048, 16, 128 | 0.400 | 1.000 |" in out   # file b's row, not file a's
    # fla / ours per row, in the forward and forward+backward columns of both tables
    assert out.count("| 2.50× |") == 4 and out.count("| 2.00× |") == 4 and out.count("| 1.25× |") == 4
    c.write_text(json.dumps(dict(_run("C", "2026-12-03", []), gpu="NVIDIA H100 80GB HBM3")))
    with pytest.raises(SystemExit):
        bench_ops.main(["--from-json", str(a), str(c), "--no-write"])
    assert "different GPUs" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit):
        bench_ops.main(["--from-json", str(tmp_path / "bad.json"), "--no-write"])
    assert "not a bench_ops --json file" in capsys.readouterr().err


def test_json_keeps_the_rows_of_a_run_cut_short(tmp_path, monkeypatch):
    """--json is rewritten after every shape: a run stopped at its second shape keeps the first row."""
    out = tmp_path / "ops.json"
    calls = []

    def fake_bench_jax(impl, arrays, reps, config=None, back_to_back=False):
        calls.append(impl)
        if len(calls) > 2:   # the second shape's Pallas timing: the run is stopped here
            raise KeyboardInterrupt
        times = dict(fwd=1.0, fwdbwd=2.0) | (dict(fwd_b2b=0.5, fwdbwd_b2b=1.5) if back_to_back else {})
        return times, np.ones((1, 64, 1, 16), np.float32)

    monkeypatch.setattr(bench_ops, "bench_jax", fake_bench_jax)
    with pytest.raises(KeyboardInterrupt):
        bench_ops.main(["--quick", "--no-write", "--skip-decode", "--shapes", "1x64x1x16,1x128x1x16",
                        "--json", str(out)])
    res = json.loads(out.read_text())
    assert [r["shape"] for r in res["rows"]] == [[1, 64, 1, 16]] and res["rows"][0]["pallas_fwd"] == 1.0
    assert not (tmp_path / "ops.json.part").exists()
