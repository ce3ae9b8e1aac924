"""Two processes x two CPU devices on localhost (jax.distributed, gloo collectives) train to the same
losses as one process with four devices, over a data x fsdp mesh, and write one shared checkpoint."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    "--no-progress", "model.hidden_size=32", "model.num_hidden_layers=1", "model.num_heads=2",
    "train.batch_size=8", "train.seq_len=16", "train.eval_every=5", "train.eval_batches=1", "train.log_every=1",
    "train.warmup_steps=2", "train.lr=0.01", "train.implementation=recurrent", "train.steps=5",
    "checkpoint.every_steps=0", "mesh.data=2", "mesh.fsdp=-1",
]
FAST = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _env(devices: int) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_process_with_as_many_devices(tmp_path):
    cmd = [sys.executable, "-m", "experiments.pretrain"]
    port = _free_port()
    procs = [
        subprocess.Popen([*cmd, "--run-dir", str(tmp_path / "two"), "--coordinator", f"127.0.0.1:{port}",
                          "--num-processes", "2", "--process-id", str(i), *ARGS], cwd=ROOT, env=_env(2),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    try:
        one = subprocess.run([*cmd, "--run-dir", str(tmp_path / "one"), *ARGS], cwd=ROOT, env=_env(4),
                             capture_output=True, text=True, timeout=600)
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert one.returncode == 0, one.stderr[-3000:]
    for p, (stdout, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr[-3000:]
    assert "4 x cpu (cpu) in 2 process(es), mesh data=2 x fsdp=2 x tensor=1" in outs[0][0], outs[0][0]
    assert "starting:" not in outs[1][0] and "final val_loss" not in outs[1][0]  # only process 0 reports
    ref, got = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in ref], rtol=1e-5)
    np.testing.assert_allclose(got[-1]["val_loss"], ref[-1]["val_loss"], rtol=1e-5)
    state = tmp_path / "two" / "checkpoints" / "5" / "state"
    assert (state / "ocdbt.process_0").exists() and (state / "ocdbt.process_1").exists()
