"""Rebuild a run's report without retraining: ``python experiments/report.py --workdir=runs/...``.

Reads the workdir's config.json, metrics and last checkpoint; writes report.md,
report.html and report/*.png there.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from pflresfim_jax import cli, report  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', None, 'A workdir written by experiments/main.py.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  path = cli.run(report.build, _WORKDIR.value)
  print(f'written: {path}, {os.path.join(_WORKDIR.value, "report.html")}')


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)
