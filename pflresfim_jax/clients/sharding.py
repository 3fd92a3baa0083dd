"""The client axis over several devices: a 1-D Mesh whose axis is named 'clients'.

Every stacked pytree (client states, data splits, metrics) has a leading client
axis ``K``. With ``D`` devices, ``K`` is padded to a multiple of ``D`` with empty
clients (train/val/test count 0, weight 0 in every aggregation, never evaluated),
and the axis is split over the mesh with ``NamedSharding(mesh, P('clients'))``.
The round function stays one jitted program: XLA's SPMD partitioner runs each
device's clients locally and turns the sums over clients in ``aggregate`` into
all-reduces. One device is the same code with a mesh of one.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
AXIS = 'clients'


def client_mesh(devices: Any = 'auto', available: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A Mesh over the devices the run uses (``engine.devices``).

  Args:
    devices: 'auto' (every device JAX sees: all hosts' under jax.distributed) or a
      positive int (the first n devices; 1 = single device).
    available: the devices to choose from (default ``jax.devices()``).
  """
  available = list(jax.devices() if available is None else available)
  if devices in ('auto', None):
    n = len(available)
  else:
    try:
      n = int(devices)
    except (TypeError, ValueError):
      raise ValueError(f"engine.devices must be 'auto' or a positive int, got {devices!r}") from None
    if not 1 <= n <= len(available):
      raise ValueError(f'engine.devices={n}, but JAX sees {len(available)} device(s)')
  return Mesh(np.array(available[:n]), (AXIS,))


def padded_clients(num_clients: int, mesh: Mesh) -> int:
  """``K`` rounded up to a multiple of the mesh size."""
  d = mesh.size
  return -(-num_clients // d) * d


def pad_clients(tree: PyTree, num_padded: int) -> PyTree:
  """Zero-pad the leading axis of every (numpy) leaf to ``num_padded``."""
  def leaf(x):
    x = np.asarray(x)
    return np.pad(x, [(0, num_padded - x.shape[0])] + [(0, 0)] * (x.ndim - 1))
  return jax.tree.map(leaf, tree)


def split(mesh: Mesh) -> NamedSharding:
  """Leading (client) axis split over the mesh."""
  return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put_clients(tree: PyTree, mesh: Mesh) -> PyTree:
  """Place a stacked pytree on the mesh, client axis split."""
  return jax.device_put(tree, split(mesh))


def abstract(tree: PyTree, sharding) -> PyTree:
  """ShapeDtypeStructs of ``tree`` carrying ``sharding`` (for restoring checkpoints)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
