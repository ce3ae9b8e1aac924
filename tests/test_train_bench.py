"""`python -m experiments.bench_train --quick --no-write`: the training benchmark end to end on a tiny
model (no fla, any backend), BENCHMARKS.md left alone."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_bench_train_prints_a_table_and_writes_nothing():
    before = (ROOT / "BENCHMARKS.md").read_text() if (ROOT / "BENCHMARKS.md").exists() else None
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    out = subprocess.run([sys.executable, "-m", "experiments.bench_train", "--quick", "--no-write"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    row = next(line for line in out.stdout.splitlines() if "| deltanet-jax |" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0].startswith("tiny (") and cells[2] == "1"
    assert float(cells[4]) > 0 and re.fullmatch(r"[\d,]+", cells[5]) and int(cells[5].replace(",", "")) > 0
    assert "fla" not in out.stdout.split("|---|")[-1].replace("vs fla", "")
    after = (ROOT / "BENCHMARKS.md").read_text() if (ROOT / "BENCHMARKS.md").exists() else None
    assert after == before
