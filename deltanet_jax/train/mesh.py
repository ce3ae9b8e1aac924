"""Device mesh: the one place that turns `mesh.{data,fsdp,tensor}` into devices, and the batch checks."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from deltanet_jax.train.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over these; "tensor" shards heads and the MLP


def _mesh_text(sizes: dict[str, int]) -> str:
    return " x ".join(f"mesh.{axis}={size}" for axis, size in sizes.items())


def resolve_mesh_shape(mesh: MeshConfig, num_devices: int) -> dict[str, int]:
    """Axis sizes with the -1 axis (if any) filled by the devices left over.

    The product must divide `num_devices` (a mesh may use a subset of the devices); with a -1 axis
    it equals `num_devices`. Raises ConfigError naming the axes otherwise.
    """
    mesh.check()
    sizes = {axis: getattr(mesh, axis) for axis in MESH_AXES}
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if num_devices % fixed:
        raise ConfigError(f"impossible mesh {_mesh_text(sizes)}: {fixed} devices do not divide the {num_devices} available")
    return {axis: num_devices // fixed if size == -1 else size for axis, size in sizes.items()}


def check_mesh_fits(shape: dict[str, int], *, num_devices: int, process_count: int = 1) -> None:
    """A mesh spanning several processes must use every device (each process holds part of it)."""
    used = math.prod(shape.values())
    if process_count > 1 and used != num_devices:
        raise ConfigError(f"mesh {_mesh_text(shape)} uses {used} of the {num_devices} devices of {process_count} processes; "
                          "a multi-process mesh must use them all (set one axis to -1)")


def unused_devices_text(shape: dict[str, int], num_devices: int) -> str | None:
    """A line saying how many devices a single-process mesh leaves idle, or None when it uses them all."""
    used = math.prod(shape.values())
    if used >= num_devices:
        return None
    return (f"the mesh {_mesh_text(shape)} uses {used} of the {num_devices} devices; the other {num_devices - used} stay "
            "idle (set one axis to -1 to use them all)")


def check_batch(shape: dict[str, int], *, batch_size: int, grad_accum: int = 1) -> None:
    """The batch must split evenly into `grad_accum` micro-batches, each over data x fsdp."""
    rows = shape["data"] * shape["fsdp"]
    if batch_size % (rows * grad_accum):
        raise ConfigError(
            f"train.batch_size={batch_size} must be divisible by mesh.data x mesh.fsdp = {rows}"
            + (f" times train.grad_accum = {grad_accum} (= {rows * grad_accum})" if grad_accum > 1 else "")
        )


def build_mesh(shape: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh of axes ("data", "fsdp", "tensor") over the first prod(shape) of `devices` (default all).

    Devices are laid out in `jax.devices()` order (process by process), "tensor" varying fastest, so
    tensor-parallel groups sit on neighbouring devices of one host and "data" spans hosts.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = math.prod(shape[a] for a in MESH_AXES)
    if n > len(devices):
        raise ConfigError(f"mesh {shape} needs {n} devices, {len(devices)} available")
    grid = np.array(devices[:n], dtype=object).reshape(tuple(shape[a] for a in MESH_AXES))
    return Mesh(grid, MESH_AXES)
