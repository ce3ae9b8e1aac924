"""`experiments.bench_ops` on CPU: the quick smoke run end to end, `--config` parsing, rendering."""

import argparse
import json

import pytest

from experiments import bench_ops
from pallas_kernels.delta_rule.common import Launch


def test_quick_run_with_breakdown(tmp_path):
    out = tmp_path / "ops.json"
    bench_ops.main(["--quick", "--no-write", "--breakdown", "--skip-decode", "--reps", "1",
                    "--config", "fold_wu=false", "--json", str(out)])
    res = json.loads(out.read_text())
    (row,) = res["rows"]
    assert row["pallas_fwd"] > 0 and row["pallas_fwdbwd"] > 0 and row["err_pallas_vs_xla"] < 0.02
    assert row["pallas_fwd_b2b"] > 0 and row["pallas_fwdbwd_b2b"] > 0 and "xla_fwd_b2b" not in row
    kernels = [r["kernel"] for r in res["breakdown"] if r["impl"] == "pallas"]
    assert kernels[:2] == ["fwd: wy_prepare (+T)", "fwd: chunk_forward"]   # the forward without folding
    assert len(kernels) == 7 and all(r["ms"] > 0 for r in res["breakdown"])


def test_parse_config():
    got = bench_ops.parse_config(["fold_wu=true", "wy=8,2", "fwd_block_v=32"])
    assert got == {"fold_wu": True, "wy": Launch(8, 2), "fwd_block_v": 32}
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
