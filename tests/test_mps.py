"""The MPS server helper of `experiments.mps`, against a stand-in control executable (CI has no
GPU): what it is called with, the environment its clients get, and its errors."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import mps

FAKE = """#!/bin/sh
# stand-in for nvidia-cuda-mps-control: -d records the pipe folder; otherwise stdin is the command
if [ "$1" = "-d" ]; then
  [ -n "$FAIL_START" ] && { echo "cannot open device" >&2; exit 3; }
  echo "$CUDA_MPS_PIPE_DIRECTORY" > "$RECORD/started"; exit 0
fi
cat > "$RECORD/command"
sleep "${QUIT_SLEEP:-0}"
"""


@pytest.fixture
def fake_control(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / mps.CONTROL
    exe.write_text(FAKE)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    record = tmp_path / "record"
    record.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("RECORD", str(record))
    for key in mps.ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    return record


def test_server_exports_its_folders_to_children_and_quits(fake_control):
    lines = []
    with mps.mps_server(log=lines.append) as env:
        pipe = Path(env["CUDA_MPS_PIPE_DIRECTORY"])
        assert pipe.is_dir() and Path(env["CUDA_MPS_LOG_DIRECTORY"]).is_dir()
        assert (fake_control / "started").read_text().strip() == str(pipe)
        seen = subprocess.run([sys.executable, "-c", "import os; print(os.environ['CUDA_MPS_PIPE_DIRECTORY'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        assert seen == str(pipe)  # a worker started inside is a client of this server
    assert (fake_control / "command").read_text() == "quit\n"
    assert all(key not in os.environ for key in mps.ENV_KEYS)
    assert not pipe.exists()  # removed once the daemon has gone
    assert lines[-1] == "MPS server stopped"


def test_a_daemon_that_waits_for_this_process_does_not_hang_it(fake_control, monkeypatch):
    monkeypatch.setenv("QUIT_SLEEP", "30")
    lines = []
    with mps.mps_server(log=lines.append, quit_wait_s=0.5):
        pass
    assert "stops once this process exits" in lines[-1]
    assert all(key not in os.environ for key in mps.ENV_KEYS)


def test_errors_name_the_problem(fake_control, monkeypatch):
    monkeypatch.setenv("FAIL_START", "1")
    with pytest.raises(RuntimeError, match="exit status 3: cannot open device"):
        with mps.mps_server(log=lambda _: None):
            pass
    assert all(key not in os.environ for key in mps.ENV_KEYS)
    monkeypatch.setenv("PATH", str(fake_control))  # no executable there
    with pytest.raises(RuntimeError, match="needs nvidia-cuda-mps-control on PATH"):
        with mps.mps_server(log=lambda _: None):
            pass


def test_mqar_refuses_mps_where_it_cannot_apply(fake_control, capsys):
    from experiments import mqar

    for argv, message in ((["--mps", "--profile", "1"], "--profile times each cell alone"),
                          (["--mps", "--workers", "1"], "--workers 1 starts none")):
        with pytest.raises(SystemExit):
            mqar.main(argv + ["--quick"])
        assert message in capsys.readouterr().err
    assert not (fake_control / "started").exists()  # refused before any daemon started
