import json
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


# ------------------------------------------------------------------ stored executables
# A fresh process per run: the program counts its traces (a Python side effect runs only
# while tracing), so a run that loaded the stored executable reports 0.
STORED = """
import collections, json, sys, jax, jax.numpy as jnp, numpy as np
from pflresfim_jax import compile_cache
folder, what, mode = sys.argv[1], sys.argv[2], sys.argv[3]
Pair = collections.namedtuple('Pair', 'a b')
traces = []
def step(state, x):
  traces.append(1)
  a = state.a * jnp.cos(x) + 1.0
  return Pair(a, state.b + jnp.sum(a)), {'mean': jnp.mean(a)}
jitted = jax.jit(step, donate_argnums=(0,))
if mode == 'jax-only':   # JAX's cache stores it; Stored is not involved
  out = jitted(Pair(jnp.ones((32, 32)), jnp.zeros(())), jnp.arange(32.0))
else:
  fn = compile_cache.Stored(jitted, folder, 'toy', {'what': what})
  if mode == 'shape':    # under a trace it is the jitted function
    print(json.dumps({'shape': list(jax.eval_shape(fn, Pair(jnp.ones((4, 4)), jnp.zeros(())),
                                                   jnp.arange(4.0))[0].a.shape)}))
    sys.exit(0)
  out = fn(Pair(jnp.ones((32, 32)), jnp.zeros(())), jnp.arange(32.0))
  out = fn(out[0], jnp.arange(32.0))        # the same program again, donated input
print(json.dumps({'traces': len(traces), 'b': np.asarray(out[0].b).tobytes().hex(),
                  'mean': float(out[1]['mean'])}))
"""


def _stored(tmp_path, what='a', mode='stored', jax_cache='xla', devices=1):
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  env['JAX_COMPILATION_CACHE_DIR'] = str(tmp_path / jax_cache)   # JAX's own cache
  env['JAX_NUM_CPU_DEVICES'] = str(devices)
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  out = subprocess.run([sys.executable, '-c', STORED, str(tmp_path / 'xla' / compile_cache.EXECUTABLES),
                        what, mode], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def _stored_files(tmp_path):
  return _entries(tmp_path / 'xla' / compile_cache.EXECUTABLES)


def test_stored_executable_is_loaded_without_tracing_and_gives_the_same_bits(tmp_path):
  first, _ = _stored(tmp_path)
  assert first['traces'] == 1 and len(_stored_files(tmp_path)) == 1
  second, _ = _stored(tmp_path)
  assert second['traces'] == 0, 'a stored program is loaded, not traced'
  assert second == {**first, 'traces': 0}
  # Another description is another key: traced again (here JAX's cache then serves the
  # same lowered program, which is not stored twice).
  other, _ = _stored(tmp_path, what='b')
  assert other['traces'] == 1 and other['b'] == first['b'] and len(_stored_files(tmp_path)) == 1
  assert _stored(tmp_path, mode='shape')[0] == {'shape': [4, 4]}


def test_a_stored_one_device_program_loads_in_a_two_device_process(tmp_path):
  # The report's prediction program runs on one device while the host CPU is split in
  # two (engine.cpu_devices): loaded, it must run on the device it was compiled for.
  first, _ = _stored(tmp_path, devices=2)
  assert first['traces'] == 1 and len(_stored_files(tmp_path)) == 1
  assert _stored(tmp_path, devices=2)[0] == {**first, 'traces': 0}


def test_unreadable_stored_executable_is_compiled_again(tmp_path):
  first, _ = _stored(tmp_path)
  (path,) = _stored_files(tmp_path)
  with open(tmp_path / 'xla' / compile_cache.EXECUTABLES / path, 'wb') as f:
    f.write(b'not a program')
  again, log = _stored(tmp_path, jax_cache='empty')   # so that it is compiled afresh
  assert 'unreadable' in log and path in log
  assert again == first and _stored_files(tmp_path) == [path]   # right, and stored anew
  assert _stored(tmp_path)[0] == {**first, 'traces': 0}
  with open(tmp_path / 'xla' / compile_cache.EXECUTABLES / path, 'wb') as f:
    f.write(b'not a program')
  again, log = _stored(tmp_path)    # JAX's cache serves it: the bad file is removed
  assert 'unreadable' in log and again == first and _stored_files(tmp_path) == []


def test_a_program_loaded_from_jax_cache_is_not_stored_again(tmp_path):
  # XLA:CPU cannot serialize an executable it deserialized (its functions go missing:
  # "Function ... not found" at the next run), so only fresh compilations are kept.
  _stored(tmp_path, mode='jax-only')
  first, _ = _stored(tmp_path)
  assert first['traces'] == 1 and _stored_files(tmp_path) == []
  assert _stored(tmp_path)[0] == first      # still right: JAX's cache serves it


def test_source_digest_follows_python_files_only(tmp_path):
  (tmp_path / 'pkg').mkdir()
  (tmp_path / 'pkg' / 'a.py').write_text('x = 1\n')
  (tmp_path / 'pkg' / 'notes.md').write_text('hello\n')
  before = compile_cache.source_digest(str(tmp_path / 'pkg'))
  (tmp_path / 'pkg' / 'notes.md').write_text('changed\n')
  assert compile_cache.source_digest(str(tmp_path / 'pkg')) == before
  (tmp_path / 'pkg' / 'a.py').write_text('x = 2\n')
  assert compile_cache.source_digest(str(tmp_path / 'pkg')) != before
  assert len(compile_cache.source_digest()) == 64   # the package's own


def test_compiler_options_reach_xla_and_key_the_stored_program(tmp_path):
  import jax
  import numpy as np
  import pytest
  jitted = jax.jit(lambda k: jax.random.normal(k, (37, 5)) * 3.0 + 1.0)
  key = jax.random.PRNGKey(3)
  folder = str(tmp_path / 'stored')
  # XLA's default level is 3 (the suite's conftest sets 0 for speed, so it is named here).
  plain = compile_cache.Stored(jitted, folder, 'toy', {'what': 'a'},
                               {'xla_backend_optimization_level': 3})
  level1 = compile_cache.Stored(jitted, folder, 'toy', {'what': 'a'},
                                {'xla_backend_optimization_level': 1})
  assert level1.compiler_options == {'xla_backend_optimization_level': 1}
  # Random draws and a multiply-add: the same bits at LLVM level 1 as at the default.
  assert np.asarray(level1(key)).tobytes() == np.asarray(plain(key)).tobytes()
  assert len(_entries(folder)) == 2, 'the options are part of the stored program key'
  bad = compile_cache.Stored(jitted, None, 'toy', {}, {'xla_no_such_option': 1})
  with pytest.raises(Exception, match='xla_no_such_option'):
    bad(key)


def test_compiled_is_the_program_the_calls_run(tmp_path):
  """Stored.compiled: the executable already held for these arguments (the benchmark
  reads its memory analysis), not a second compilation."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  fn = compile_cache.Stored(jax.jit(lambda x: jnp.sin(x) @ x.T), None, 'toy', {})
  x = jnp.ones((16, 16))
  out = fn(x)
  program = fn.compiled(x)
  assert program is fn.compiled(x) and fn._cache_size() == 1
  assert np.asarray(program(x)).tobytes() == np.asarray(out).tobytes()
  assert program.memory_analysis().output_size_in_bytes == 16 * 16 * 4
  fn.compiled(jnp.ones((8, 16)))      # another signature: another program
  assert fn._cache_size() == 2


def test_a_program_whose_devices_are_unknown_runs_and_is_not_stored(tmp_path, monkeypatch, caplog):
  """Storing is best-effort: a runtime that cannot say which devices a program runs on
  (``runtime_executable()`` may be None) gets the program run, not stored, and a warning."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  monkeypatch.setattr(jax.stages.Compiled, 'runtime_executable', lambda self: None)
  folder = str(tmp_path / 'stored')
  fn = compile_cache.Stored(jax.jit(lambda x: jnp.cos(x) * 7.0 - x), folder, 'toy', {'what': 'd'})
  x = jnp.arange(12.0)
  with caplog.at_level('WARNING'):
    out = fn(x)
  np.testing.assert_allclose(np.asarray(out), np.cos(np.arange(12.0)) * 7.0 - np.arange(12.0),
                             rtol=1e-6, atol=1e-6)
  assert _entries(folder) == [] and 'not stored' in caplog.text
