"""Entry point: ``python experiments/main.py --config=configs/vessel.py [--workdir=...]``.

Config fields are overridable: ``--config.method=fedbn --config.rounds=50``,
``--config.method=all``, ``--config.seeds=0,1,2``, ``--config.data.root=/data/vessel``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from pflresfim_jax import cli, train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder (default: runs/<data>-<method>).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  cli.prepare(config)   # before any other JAX call: devices, compilation cache
  workdir = _WORKDIR.value or train.default_workdir(config)
  cli.run(train.train_and_evaluate, config, workdir)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
