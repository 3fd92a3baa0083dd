"""What the experiments/ entry points share: log set-up and exit codes."""
from __future__ import annotations

import sys
from typing import Any, Callable

from absl import flags, logging

from pflresfim_jax import train


def run(fn: Callable[..., Any], *args) -> Any:
  """Call ``fn(*args)`` as a command: quiet logs, clear errors, exit 130 on Ctrl-C.

  Logs go to stderr at WARNING unless ``--verbosity`` is given (orbax logs every
  save at INFO). A config or data error exits 1 with one line naming the field or
  file; an interrupted run (checkpoint written) exits 130.
  """
  logging.get_absl_handler().python_handler.stream = sys.stderr
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  try:
    return fn(*args)
  except train.Interrupted as e:
    print(f'interrupted: {e}', file=sys.stderr)
    sys.exit(130)
  except (ValueError, FileNotFoundError, NotImplementedError, train.Diverged) as e:
    sys.exit(f'error: {e}')
