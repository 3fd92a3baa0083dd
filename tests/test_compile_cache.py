import os
import subprocess
import sys

from pflresfim_jax import compile_cache
from pflresfim_jax.config import base_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A fresh process (the cache folder is fixed at a process's first compile): the entry
# points' call, then one jitted program.
PROGRAM = """
import sys, jax, jax.numpy as jnp
from pflresfim_jax import compile_cache
from pflresfim_jax.config import base_config
c = base_config(); c.data.cache_dir = sys.argv[1]; c.compile_cache = sys.argv[2] == 'on'
print(compile_cache.from_config(c))
print(float(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).sum()))
"""


def _run(cache_dir, on):
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'   # the test's program compiles in ms
  out = subprocess.run([sys.executable, '-c', PROGRAM, str(cache_dir), on], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout.split('\n')[0]


def _entries(folder):
  return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_on_by_default_under_the_data_cache_and_reused(tmp_path):
  assert base_config().compile_cache is True
  xla = str(tmp_path / 'xla')
  assert _run(tmp_path, 'on') == xla
  first = _entries(xla)
  assert first, 'the first run stores its compiled programs'
  _run(tmp_path, 'on')
  assert _entries(xla) == first   # the second run found them: nothing new compiled


def test_off_writes_nothing(tmp_path):
  assert _run(tmp_path, 'off') == 'None'
  assert _entries(tmp_path / 'xla') == []


def test_environment_folder_wins(monkeypatch, tmp_path):
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path / 'mine'))
  import jax
  before = jax.config.jax_compilation_cache_dir
  try:
    assert compile_cache.enable(str(tmp_path / 'other')) == str(tmp_path / 'mine')
  finally:
    jax.config.update('jax_compilation_cache_dir', before)
