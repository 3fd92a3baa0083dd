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

import logging
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
AXIS = 'clients'
log = logging.getLogger(__name__)


def split_host_cpu(count: int) -> int:
  """Make the host CPU ``count`` XLA devices (``engine.cpu_devices``); call before JAX
  starts its backends. Returns the number of CPU devices in effect.

  One XLA:CPU device runs its operations one after another, each on the cores it can
  use: the small convolutions of a segmentation round keep about 1.4 of 2 cores busy.
  With two devices the clients are split between them ('engine.devices' 'auto') and each
  runs its share on its own thread: the phantom's round takes 4.3 s instead of 5.9 s on
  a 2-core CPU. Each device's program is compiled for its own clients, so floats move in
  the last bits with the count (results are reproducible for a given count). The
  environment wins: ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS`` or
  ``JAX_NUM_CPU_DEVICES``. Once JAX's backends run the count cannot change: then the
  count they have is kept and returned (with a warning when it differs).
  """
  count = int(count)
  reason = 'set by the environment'
  if not ('xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', '')
          or os.environ.get('JAX_NUM_CPU_DEVICES')):
    try:
      jax.config.update('jax_num_cpu_devices', count)
    except RuntimeError:   # the backends already run (library use after other JAX work)
      reason = 'JAX was already running'
  have = len(jax.devices('cpu'))
  if have != count:
    log.warning('engine.cpu_devices=%d, but the host CPU is %d XLA device(s) (%s)', count, have,
                reason)
  return have


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
