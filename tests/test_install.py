"""The accelerator extras: one line each, and what they pull exists for the installed jax.

A full ``pip install --dry-run '.[cuda]'`` downloads every wheel whose index entry has
no separate metadata (here: all of them, 718 MB for cuDNN alone), so the check reads
the pieces instead: the extra's line in setup.cfg, the installed jax's own metadata for
that extra, and the package index's list of versions of the plugin it pins.
"""
import configparser
import os
import re
import subprocess
import sys
from importlib import metadata

import pytest
from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def extra_lines(extra):
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(ROOT, 'setup.cfg'))
  lines = cfg['options.extras_require'][extra].splitlines()
  return [Requirement(line.strip()) for line in lines if line.strip()]


def index_versions(name):
  out = subprocess.run([sys.executable, '-m', 'pip', 'index', 'versions', name],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  found = re.search(r'Available versions: (.*)', out.stdout)
  assert found, out.stdout
  return [v.strip() for v in found.group(1).split(',')]


@pytest.mark.parametrize('extra,plugin', [('cuda', 'jax-cuda12-plugin'), ('tpu', 'libtpu')])
def test_accelerator_extra_pulls_a_plugin_for_this_jax(extra, plugin):
  (req,) = extra_lines(extra)
  jax_version = metadata.version('jax')
  assert req.name == 'jax' and req.specifier.contains(jax_version), req
  # What the installed jax asks for under that extra (its plugin pinned to its release).
  wanted = [Requirement(r) for r in metadata.requires('jax')]
  pins = [r for r in wanted if r.marker is not None and r.name == plugin and
          any(r.marker.evaluate({'extra': e}) for e in req.extras)]
  assert pins, f'jax {jax_version} has no extra {sorted(req.extras)} pulling {plugin}'
  available = index_versions(plugin)
  assert any(pins[0].specifier.contains(v) for v in available), (pins[0], available[:5])
