"""A grid of runs: ``python experiments/sweep.py --config=configs/vessel.py --sweep='resfim.ratio=0.1,0.2;spectral.ratio=0.01,0.05'``.

Every cell is a workdir ``<workdir>/<field>=<value>,...`` (finished runs are skipped,
interrupted ones resume); ``<workdir>/sweep.md`` and ``sweep.csv`` combine them.
Methods and seeds are the usual fields: ``--config.method=all --config.seeds=0,1,2``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from pflresfim_jax import cli, sweep, train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
_SWEEP = flags.DEFINE_string('sweep', None, "Grid: 'field=v1,v2;other.field=w1,w2'.")
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder (default: runs/sweep-<data>-<method>).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  cli.prepare(config)   # before any other JAX call: devices, compilation cache
  workdir = _WORKDIR.value or os.path.join(
      os.path.dirname(train.default_workdir(config)), 'sweep-' + os.path.basename(train.default_workdir(config)))
  cli.run(sweep.run, config, _SWEEP.value, workdir)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  flags.mark_flag_as_required('sweep')
  app.run(main)
