"""Exact resume: a run killed with SIGKILL after its step-20 checkpoint continues with the very losses
of an uninterrupted run; a damaged checkpoint is set aside for the one before; SIGTERM saves and stops."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    "--no-progress", "model.hidden_size=32", "model.num_hidden_layers=1", "model.num_heads=2",
    "train.batch_size=4", "train.seq_len=16", "train.eval_every=40", "train.eval_batches=1", "train.log_every=1",
    "train.warmup_steps=2", "train.lr=0.01", "train.min_lr=0.001", "train.implementation=recurrent",
    "checkpoint.every_steps=20", "checkpoint.keep=2",
]
# Every run of this module compiles with the same (fast, unoptimised) flags, so results compare bitwise.
ENV = dict(os.environ, JAX_PLATFORMS="cpu",
           XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")

# Trains like `python -m experiments.pretrain`, but kills itself with SIGKILL right after writing the
# metrics of step 25, once the step-20 checkpoint is on disk (as a machine failure would).
KILLED_AT_25 = """
import os, signal, sys
from deltanet_jax.train import checkpoint, metrics
savers = []
save = checkpoint.RunCheckpointer.save
def tracked_save(self, step, *a, **k):
    savers.append(self)
    return save(self, step, *a, **k)
checkpoint.RunCheckpointer.save = tracked_save
write = metrics.MetricsWriter.write
def write_then_die(self, record):
    write(self, record)
    if record["step"] == 25:
        savers[-1].wait()
        os.kill(os.getpid(), signal.SIGKILL)
metrics.MetricsWriter.write = write_then_die
from experiments.pretrain import main
main(sys.argv[1:])
"""


def _pretrain(run_dir, *extra, script=None, timeout=300):
    cmd = [sys.executable, "-c", script] if script else [sys.executable, "-m", "experiments.pretrain"]
    return subprocess.run([*cmd, "--run-dir", str(run_dir), *ARGS, *extra], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def _losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in records}


def _steps(run_dir):
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("resume") / "whole"
    out = _pretrain(run_dir, "train.steps=40")
    assert out.returncode == 0, out.stderr[-3000:]
    return _losses(run_dir)


def test_sigkill_after_a_checkpoint_then_resume_is_exact(uninterrupted, tmp_path):
    run_dir = tmp_path / "killed"
    out = _pretrain(run_dir, "train.steps=40", script=KILLED_AT_25)
    assert out.returncode == -signal.SIGKILL, (out.returncode, out.stderr[-3000:])
    assert _steps(run_dir) == [20] and max(_losses(run_dir)) == 25  # died mid-way, past its checkpoint

    out = _pretrain(run_dir, "train.steps=40")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming at step 20" in out.stdout
    resumed = _losses(run_dir)
    assert sorted(resumed) == list(range(1, 41))  # records past the checkpoint were rewritten, not repeated
    for step in range(21, 41):
        assert resumed[step] == uninterrupted[step], step  # bitwise
    assert _steps(run_dir) == [20, 40]

    # Damage the newest checkpoint (a data file cut short) and leave an unfinished temporary one beside it:
    # the next run warns, moves checkpoint 40 aside untouched, and resumes from 20 to the same losses.
    state_files = sorted((p for p in (run_dir / "checkpoints" / "40" / "state").rglob("*") if p.is_file()),
                         key=lambda p: p.stat().st_size)
    victim = state_files[-1]
    cut = victim.stat().st_size // 2
    victim.write_bytes(victim.read_bytes()[:cut])
    relative = victim.relative_to(run_dir / "checkpoints" / "40" / "state")
    (run_dir / "checkpoints" / "60.orbax-checkpoint-tmp-1").mkdir()
    (run_dir / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 0.0, "grad_norm": 0.0}) + "\n" for s in range(1, 41)))
    out = _pretrain(run_dir, "train.steps=40")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "checkpoint 40 is damaged" in out.stdout and "resuming at step 20" in out.stdout, out.stdout
    aside = list((run_dir / "checkpoints-corrupt").iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("40-")
    assert (aside[0] / "state" / relative).stat().st_size == cut  # kept as it was found
    again = _losses(run_dir)
    for step in range(21, 41):
        assert again[step] == uninterrupted[step], step
    assert _steps(run_dir) == [20, 40]


def test_sigterm_saves_and_stops(tmp_path):
    run_dir = tmp_path / "term"
    # no periodic save: steps take milliseconds, so the signal may land after step 20
    proc = subprocess.Popen([sys.executable, "-m", "experiments.pretrain", "--run-dir", str(run_dir), *ARGS,
                             "train.steps=100000", "checkpoint.every_steps=100000"], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, stderr[-3000:])
    assert "SIGTERM: stopped after step" in stdout, stdout
    stopped = int(stdout.split("SIGTERM: stopped after step ")[1].split()[0])
    assert 3 <= stopped < 100000 and _steps(run_dir) == [stopped]
    assert "Traceback" not in stderr
