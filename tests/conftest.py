import os
import sys
import tempfile

# Tests run on the CPU whatever the machine has. The models in the tests are tiny, so
# XLA's compile time dominates: skip its expensive backend optimisations, and share
# compiled programs between tests and the entry points they start as subprocesses
# through a compilation cache private to this test session.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Appended, so that a setting from outside (CI's second pass sets
# --xla_cpu_max_isa) keeps the fast compile too.
if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0').strip()
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:   # xdist workers inherit the controller's
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='pflresfim-test-xla-')
# The entry points' own cache (data.cache_dir's default: the drawn phantom, decoded data)
# is private to the session too, not the user's ~/.cache.
if 'PFLRESFIM_TEST_CACHE' not in os.environ:
  os.environ['PFLRESFIM_TEST_CACHE'] = os.environ['XDG_CACHE_HOME'] = tempfile.mkdtemp(
      prefix='pflresfim-test-cache-')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
sys.path.insert(0, os.path.dirname(__file__))
