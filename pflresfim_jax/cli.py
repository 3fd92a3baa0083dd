"""What the experiments/ entry points share: start-up, log set-up and exit codes."""
from __future__ import annotations

import os
import sys
from typing import Any, Callable

from absl import flags, logging

from pflresfim_jax import compile_cache, config as config_lib, train
from pflresfim_jax.clients import sharding


def _quiet_logs() -> None:
  logging.get_absl_handler().python_handler.stream = sys.stderr
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)


def prepare(config) -> None:
  """What an entry point does before any other JAX work, in this order: join the
  cluster (``config.distributed``), else split the host CPU into
  ``config.engine.cpu_devices`` XLA devices (the count in effect is written back, so
  config.json tells it); then turn on the compilation cache (``compile_cache``).
  A bad value exits 1 naming the field."""
  _quiet_logs()
  try:
    config_lib.validate(config)
    if config.distributed:
      from pflresfim_jax import distributed
      distributed.initialize(config)
    else:
      config.engine.cpu_devices = sharding.split_host_cpu(config.engine.cpu_devices)
    compile_cache.from_config(config)
  except ValueError as e:
    sys.exit(f'error: {e}')


def run(fn: Callable[..., Any], *args) -> Any:
  """Call ``fn(*args)`` as a command: quiet logs, clear errors, exit 130 on Ctrl-C.

  Logs go to stderr at WARNING unless ``--verbosity`` is given (orbax logs every
  save at INFO). A config or data error exits 1 with one line naming the field or
  file; an interrupted run (its last completed round on disk) exits 128 + the signal
  (130 for Ctrl-C, 143 for SIGTERM).
  """
  _quiet_logs()
  try:
    return fn(*args)
  except train.Interrupted as e:
    print(f'interrupted: {e}', file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    # A round abandoned in a worker thread is still running inside XLA: leave without
    # waiting for it (everything the run keeps is already on disk).
    os._exit(128 + e.signum)
  except (ValueError, FileNotFoundError, NotImplementedError, train.Diverged) as e:
    sys.exit(f'error: {e}')
