"""Device meshes, shardings and global batches for data-parallel (and later model-parallel) steps.

bob_jax runs every jitted step over a `jax.sharding.Mesh`: the batch dimension is split over the
"data" axis and small states (linear heads, optimiser moments) are replicated. The same code runs on
one CPU device, 8 simulated devices in tests, one GPU, or many hosts: data loaders produce the
process-local part of each global batch and `shard_batch` assembles the global `jax.Array`.

The mesh is built with `jax.sharding.Mesh` directly (axis types "Auto"), not `jax.make_mesh`, whose
default axis types changed across jax releases; Auto keeps GSPMD propagation semantics on all
supported versions (jax 0.10.2 .. 0.12).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """Build a mesh over `devices` (default: all devices).

    Args:
      shape: ordered mapping axis name -> size, e.g. {"data": -1} or {"data": 4, "model": 2}. At most
        one size may be -1, meaning "all remaining devices". Default: a single "data" axis.
      devices: the devices to use (default `jax.devices()`); e.g. `jax.devices()[:1]` for a 1-device
        mesh.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if n == 0:
        raise ValueError("make_mesh: got an empty device list; pass at least one device.")
    shape = dict(shape) if shape is not None else {DATA_AXIS: -1}
    if not shape:
        raise ValueError("make_mesh: shape must name at least one axis, e.g. {'data': -1}.")
    for name, size in shape.items():
        if not isinstance(size, int | np.integer) or (size < 1 and size != -1):
            raise ValueError(f"make_mesh: axis {name!r} has size {size!r}; use a positive int or -1.")
    free = [k for k, v in shape.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"make_mesh: only one axis may be -1, got {free} in {shape}.")
    known = math.prod(v for v in shape.values() if v != -1)
    if free:
        if n % known:
            raise ValueError(
                f"make_mesh: cannot fill axis {free[0]!r}: the other axes use {known} devices, which does "
                f"not divide the {n} available devices. Choose axis sizes whose product divides {n}."
            )
        shape[free[0]] = n // known
    if math.prod(shape.values()) != n:
        raise ValueError(
            f"make_mesh: mesh shape {shape} needs {math.prod(shape.values())} devices but {n} devices "
            f"were given; make the product of the axis sizes equal {n} (or use -1 for one axis)."
        )
    sizes = tuple(shape.values())
    if len(devices) == len(jax.devices()) and devices == list(jax.devices()):
        # All devices: let jax order them by physical topology (matters on TPU/multi-GPU hosts).
        from jax.experimental import mesh_utils

        try:
            device_array = mesh_utils.create_device_mesh(sizes, devices=devices)
        except (ValueError, NotImplementedError, AssertionError):
            device_array = np.asarray(devices, dtype=object).reshape(sizes)
    else:
        device_array = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(device_array, tuple(shape.keys()))


def num_data_shards(mesh: Mesh) -> int:
    """Number of shards the batch dimension is split into (size of the "data" axis, 1 if absent)."""
    return int(mesh.shape.get(DATA_AXIS, 1))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Batch dimension (axis 0) split over the "data" axis; other dimensions replicated."""
    if DATA_AXIS not in mesh.axis_names:
        raise ValueError(f"data_sharding: mesh axes {mesh.axis_names} have no {DATA_AXIS!r} axis.")
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated over every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Turn a dict of process-local numpy arrays into global arrays sharded over the "data" axis.

    Every process passes its own slice of the global batch (the whole batch when single-process); the
    global batch size is the local size times the process count. It must divide evenly into the data
    shards of the mesh.
    """
    sharding = data_sharding(mesh)
    shards = num_data_shards(mesh)
    out = {}
    local_size = None
    for key, value in batch.items():
        value = np.asarray(value)
        if value.ndim == 0:
            raise ValueError(f"shard_batch: {key!r} is a scalar; every batch entry needs a batch dimension.")
        if local_size is None:
            local_size = value.shape[0]
        elif value.shape[0] != local_size:
            raise ValueError(
                f"shard_batch: {key!r} has batch size {value.shape[0]} but other entries have {local_size}; "
                "all entries of a batch must share the leading dimension."
            )
        global_size = value.shape[0] * jax.process_count()
        if global_size % shards:
            raise ValueError(
                f"shard_batch: global batch size {global_size} (entry {key!r}) is not divisible by the "
                f"{shards} data shards of the mesh; use a batch size that is a multiple of {shards} "
                "(pad and mask the last batch for evaluation)."
            )
        global_shape = (global_size,) + value.shape[1:]
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out
