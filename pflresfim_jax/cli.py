"""What the experiments/ entry points share: log set-up and exit codes."""
from __future__ import annotations

import os
import sys
from typing import Any, Callable

from absl import flags, logging

from pflresfim_jax import train


def run(fn: Callable[..., Any], *args) -> Any:
  """Call ``fn(*args)`` as a command: quiet logs, clear errors, exit 130 on Ctrl-C.

  Logs go to stderr at WARNING unless ``--verbosity`` is given (orbax logs every
  save at INFO). A config or data error exits 1 with one line naming the field or
  file; an interrupted run (its last completed round on disk) exits 128 + the signal
  (130 for Ctrl-C, 143 for SIGTERM).
  """
  logging.get_absl_handler().python_handler.stream = sys.stderr
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
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
