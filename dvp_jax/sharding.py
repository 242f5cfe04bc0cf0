"""The device mesh and the two shardings every trainer uses.

One mesh axis, ``'data'``, spans every device of every process. Train states are replicated
(``replicated(mesh)``); batches are split along their leading axis (``batch_sharded(mesh)``).
Each process feeds only its own devices: its host-local batch of shape
``(global_batch // process_count, ...)`` becomes one global ``jax.Array`` of shape
``(global_batch, ...)`` through ``to_global``.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from dvp_jax.errors import ConfigError

DATA_AXIS = "data"


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes), axis ``'data'``."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (train states, queues)."""
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``'data'``; other axes whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def num_data_shards(mesh: Mesh) -> int:
    """How many ways a batch is split: the size of the ``'data'`` axis."""
    return mesh.shape[DATA_AXIS]


def check_global_batch(global_batch: int, mesh: Mesh, key: str = "batch_size") -> None:
    """Refuses a global batch that the devices and processes cannot split evenly."""
    shards = num_data_shards(mesh)
    if global_batch % shards:
        raise ConfigError(
            f"config.{key}={global_batch} is not divisible by the {shards} devices of the mesh; "
            f"use a multiple of {shards} (e.g. {max(shards, global_batch // shards * shards)}).")
    if global_batch % jax.process_count():
        raise ConfigError(
            f"config.{key}={global_batch} is not divisible by the {jax.process_count()} processes.")


def to_global(host_batch: Any, mesh: Mesh) -> Any:
    """Host-local numpy batch pytree (leading dim = host share) -> global sharded jax.Arrays."""
    sharding = batch_sharded(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), host_batch)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree of host arrays on every device (identical on all processes)."""
    return jax.device_put(tree, replicated(mesh))
