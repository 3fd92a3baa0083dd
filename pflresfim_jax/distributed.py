"""Many processes, one simulation: ``jax.distributed`` set-up (``config.distributed``).

With ``--config.distributed=true`` every process runs the same command;
:func:`initialize` connects them before any other JAX call (auto-detection on TPU
pods, Slurm and MPI, or the explicit ``config.cluster`` fields), after which
``jax.devices()`` lists every process's devices and the 'clients' Mesh
(clients/sharding.py) spans them all. Every process loads the same federation on
its host and places only its own devices' clients (jax.device_put with the global
sharding); the jitted round is the same SPMD program everywhere. Only process 0
writes logs, metrics, results and reports; checkpoints are written by orbax from
every process (each its own shards), so the workdir must be one shared folder.
"""
from __future__ import annotations

import jax


def initialize(config) -> None:
  """``jax.distributed.initialize`` from ``config.cluster`` (empty / -1 fields: auto-detect).

  On CPU, cross-process collectives use gloo.
  """
  c = config.cluster
  kwargs = {}
  if c.coordinator_address:
    kwargs['coordinator_address'] = str(c.coordinator_address)
  if int(c.num_processes) > 0:
    kwargs['num_processes'] = int(c.num_processes)
  if int(c.process_id) >= 0:
    kwargs['process_id'] = int(c.process_id)
  if c.local_device_ids:
    try:
      kwargs['local_device_ids'] = [int(x) for x in str(c.local_device_ids).split(',')]
    except ValueError:
      raise ValueError(f'cluster.local_device_ids must be comma-separated ints, '
                       f'got {c.local_device_ids!r}') from None
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**kwargs)
  if not is_main():   # one process speaks: the others log errors only
    import logging
    from absl import logging as absl_logging
    logging.getLogger('pflresfim_jax').setLevel(logging.ERROR)
    absl_logging.set_verbosity(absl_logging.ERROR)


def is_main() -> bool:
  """True on the process that writes files (process 0; always true on one process)."""
  return jax.process_index() == 0
