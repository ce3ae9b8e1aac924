"""A CUDA MPS (multi-process service) server for the processes of one experiment.

Without it, processes sharing a GPU take turns on it (time slices), so several small models
training side by side get no more GPU time in all than one. As clients of one MPS server their
kernels run on the SMs at the same time.

    with mps_server(log=print):
        ...  # CUDA processes started here (and this one, if it starts CUDA here) are clients
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Iterator

CONTROL = "nvidia-cuda-mps-control"
ENV_KEYS = ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY")


def control_path() -> str | None:
    """The MPS control executable on PATH, or None."""
    return shutil.which(CONTROL)


@contextlib.contextmanager
def mps_server(log: Callable[[str], None] = print, quit_wait_s: float = 10.0) -> Iterator[dict[str, str]]:
    """Start an MPS control daemon with pipe and log folders of its own (a fresh temporary folder,
    so that no other MPS server is touched), export them in `os.environ` for this process and the
    processes it starts, and on exit (errors included) restore the environment and tell the daemon
    to quit, waiting at most `quit_wait_s` (it goes once its last client has, maybe this process).
    Yields the exported variables. Raises RuntimeError when the executable is missing or the daemon
    does not start. CUDA must not have started in this process yet for it to be a client too."""
    exe = control_path()
    if exe is None:
        raise RuntimeError(f"MPS needs {CONTROL} on PATH (it comes with the NVIDIA driver); it was not found")
    root = Path(tempfile.mkdtemp(prefix="mps-"))
    env = {ENV_KEYS[0]: str(root / "pipe"), ENV_KEYS[1]: str(root / "log")}
    for path in env.values():
        Path(path).mkdir()
    started = subprocess.run([exe, "-d"], env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    if started.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        detail = (started.stderr or started.stdout).strip()
        raise RuntimeError(f"{CONTROL} -d failed with exit status {started.returncode}" + (f": {detail}" if detail else ""))
    before = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    log(f"MPS server started for this run (pipe folder {env[ENV_KEYS[0]]})")
    try:
        yield env
    finally:
        # The daemon quits once its clients have gone; this process may be one (its CUDA context
        # lives until it exits), so ask and wait a little, never for good.
        quit_cmd = subprocess.Popen([exe], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    env={**os.environ, **env}, text=True, start_new_session=True)
        quit_cmd.stdin.write("quit\n")
        quit_cmd.stdin.close()
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        try:
            rc = quit_cmd.wait(timeout=quit_wait_s)
        except subprocess.TimeoutExpired:
            log("MPS server asked to quit; it stops once this process exits")
        else:
            if rc != 0:
                log(f"warning: stopping the MPS server failed with exit status {rc}: {quit_cmd.stderr.read().strip()}")
            else:
                log("MPS server stopped")
                shutil.rmtree(root, ignore_errors=True)
