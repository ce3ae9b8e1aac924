"""Several processes (hosts) training one model: start-up, which batch rows each process feeds,
global arrays from process-local data, and small JSON exchanges between processes."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding


def cluster_environment() -> str | None:
    """Name of a multi-process launcher detected from the environment (SLURM, Open MPI, or JAX's own
    JAX_COORDINATOR_ADDRESS), or None for a single process."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and os.environ.get("SLURM_JOB_ID"):
        return "SLURM"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "Open MPI"
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, auto: bool = False) -> bool:
    """Join a multi-process run before any device is touched; True when one was joined.

    Explicit: `coordinator` ("host:port" of process 0), `num_processes` and `process_id` together.
    Otherwise, with `auto` or a launcher found by `cluster_environment`, JAX reads them from the
    environment. Raises ValueError when only some of the explicit values are given.
    """
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("--coordinator, --num-processes and --process-id must be given together")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id must be in [0, --num-processes={num_processes}), got {process_id}")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
        return True
    if auto or cluster_environment():
        jax.distributed.initialize()
        return True
    return False


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> slice:
    """The contiguous block of batch rows (axis 0) that this process's devices hold under `sharding`."""
    spans = {(s[0].start or 0, global_shape[0] if s[0].stop is None else s[0].stop)
             for s in sharding.addressable_devices_indices_map(global_shape).values()}
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    if sum(b - a for a, b in spans) != hi - lo:
        raise ValueError(f"the rows of process {jax.process_index()} are not one block: {sorted(spans)}")
    return slice(lo, hi)


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding, batch_size: int) -> dict[str, jax.Array]:
    """Global [batch_size, ...] arrays from this process's rows (`process_rows`) of each array."""
    return {name: jax.make_array_from_process_local_data(sharding, np.asarray(x), (batch_size,) + x.shape[1:])
            for name, x in local.items()}


def gather_json(obj: Any) -> list[Any]:
    """Every process's JSON-serialisable `obj`, in process order (a collective: all must call it)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, sizes)]


def any_process(flag: bool) -> bool:
    """True when `flag` is true on any process (a collective when there are several)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.array([flag], np.int32))).max())
