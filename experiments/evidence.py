"""Does ResFIM's residual pick the parameters to keep local? ``python experiments/evidence.py``.

Runs the grid of pflresfim_jax/evidence.py (controlled phantom shifts x baselines and
pfl_resfim with every mask selector x seeds) and writes docs/evidence.md. Resumable: run
the same command again after an interruption and only the missing runs train.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from pflresfim_jax import cli, evidence  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(ROOT, 'configs', 'evidence.py'), 'Experiment config file.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', os.path.join('runs', 'evidence'), 'Folder of the runs.')
_OUT = flags.DEFINE_string('out', os.path.join(ROOT, 'docs', 'evidence.md'), 'The markdown written.')
_SHIFTS = flags.DEFINE_list('shifts', list(evidence.SHIFTS), 'Phantom shifts to compare.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  cli.prepare(config)   # before any other JAX call: devices, compilation cache
  cli.run(evidence.run, config, _WORKDIR.value, _OUT.value, _SHIFTS.value)


if __name__ == '__main__':
  app.run(main)
