"""Device mesh shape: the one place that turns `mesh.{data,fsdp,tensor}` into devices."""

from __future__ import annotations

import math

from deltanet_jax.train.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_mesh_shape(mesh: MeshConfig, num_devices: int) -> dict[str, int]:
    """Axis sizes with the -1 axis (if any) filled by the devices left over.

    The product must divide `num_devices` (a mesh may use a subset of the devices); with a -1 axis
    it equals `num_devices`. Raises ConfigError naming the axes otherwise.
    """
    mesh.check()
    sizes = {axis: getattr(mesh, axis) for axis in MESH_AXES}
    fixed = math.prod(size for size in sizes.values() if size != -1)
    shown = " x ".join(f"mesh.{axis}={size}" for axis, size in sizes.items())
    if num_devices % fixed:
        raise ConfigError(f"impossible mesh {shown}: {fixed} devices do not divide the {num_devices} available")
    return {axis: num_devices // fixed if size == -1 else size for axis, size in sizes.items()}


def check_supported(shape: dict[str, int]) -> None:
    """Training runs on one device so far: reject meshes spanning more, naming them."""
    if math.prod(shape.values()) > 1:
        shown = " x ".join(f"{axis}={size}" for axis, size in shape.items())
        raise ConfigError(
            f"mesh {shown} spans {math.prod(shape.values())} devices; sharded training is not implemented "
            "yet: use a mesh of one device (mesh.data=1 mesh.fsdp=1 mesh.tensor=1)"
        )
