"""JAX's persistent compilation cache: a second run reuses the compiled programs.

Compiling the round is most of a short run's time on a CPU (the phantom's round compiles
for about 1.5 minutes), and the same shapes compile to the same program every time, so
the entry points keep XLA's executables on disk (config ``compile_cache``, default on)
under ``<data.cache_dir>/xla`` (``~/.cache/pflresfim_jax/xla`` by default). A program
loaded from the cache is the one that was compiled: results do not change.

The trainer's init and round programs are also kept by :class:`Stored` under
``<cache>/xla/pflresfim-executables``, keyed without tracing (package source, versions,
devices, CPU features, config, argument shapes), so a cached run skips tracing and
lowering them too; and the round compiles in a background thread while the initial
state's program compiles (:meth:`Stored.prepare`).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import pickle
import platform
import sys
import threading
import zlib
from typing import Callable, Dict, Optional

import jax
from jax.experimental import serialize_executable

from pflresfim_jax.data import loaders

log = logging.getLogger(__name__)


def enable(folder: str, min_compile_secs: Optional[float] = None) -> str:
  """Cache compiled programs in ``folder``; ``JAX_COMPILATION_CACHE_DIR`` wins if set.

  Call before the first compilation. ``min_compile_secs``: programs that compile faster
  are not stored (None: JAX's default, 1 s). Returns the folder in use.
  """
  folder = os.environ.get('JAX_COMPILATION_CACHE_DIR') or folder
  jax.config.update('jax_compilation_cache_dir', folder)
  if min_compile_secs is not None:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', float(min_compile_secs))
  return folder


def from_config(config) -> Optional[str]:
  """:func:`enable` under the data cache folder when ``config.compile_cache`` is on."""
  if not config.get('compile_cache', True):
    return None
  return enable(os.path.join(loaders.cache_root(config), 'xla'))


# ---------------------------------------------------------------- stored executables
# JAX's cache is keyed by the lowered program, so a cached run still traces and lowers
# the round to look it up (about 11 s of the phantom's cached run on a 2-core CPU). For
# the trainer's own programs (the built-in methods' init and round) we also keep the
# compiled executable under a key of what determines it: the package's source, the
# versions and settings of jax and its companions, the devices and the CPU's features,
# the caller's description (method, config, client count, image shape) and the
# arguments' shapes, dtypes and shardings. A hit loads it without tracing.

EXECUTABLES = 'pflresfim-executables'
_ENV_VARS = ('XLA_FLAGS', 'LIBTPU_INIT_ARGS', 'CUDA_VISIBLE_DEVICES', 'TPU_VISIBLE_CHIPS',
             'JAX_PLATFORMS', 'NVIDIA_TF32_OVERRIDE')
_VOLATILE = ('cache', 'log', 'explain', 'dump', 'pprint', 'traceback')   # jax settings that change no program
_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'ml_collections', 'chex', 'ml_dtypes')


def _digest(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=repr).encode()).hexdigest()[:32]


def _cpu_features() -> str:
  """The host CPU's feature flags (XLA:CPU compiles for them), or its name elsewhere."""
  try:
    with open('/proc/cpuinfo') as f:
      flags = next((line for line in f if line.startswith(('flags', 'Features'))), '')
  except OSError:
    flags = ''
  return flags or f'{platform.machine()} {platform.processor()}'


def source_digest(root: Optional[str] = None) -> str:
  """sha256 over every .py file under ``root`` (default: this package), by relative path:
  a changed line is another program."""
  root = root or os.path.dirname(os.path.abspath(__file__))
  h = hashlib.sha256()
  for folder, dirs, files in sorted(os.walk(root)):
    dirs.sort()
    for name in sorted(f for f in files if f.endswith('.py')):
      path = os.path.join(folder, name)
      h.update(os.path.relpath(path, root).encode())
      with open(path, 'rb') as f:
        h.update(f.read())
  return h.hexdigest()


def environment() -> dict:
  """Everything besides the caller's description and the arguments that a compiled
  program of this package depends on (see the section comment)."""
  def version(package):
    try:
      return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      return None
  device = jax.devices()[0]
  return {'versions': {p: version(p) for p in _PACKAGES}, 'python': sys.version,
          'backend': [jax.default_backend(), device.client.platform_version],
          'devices': [[d.id, d.device_kind, d.process_index] for d in jax.devices()],
          'processes': jax.process_count(), 'cpu': _cpu_features(),
          'env': {v: os.environ.get(v) for v in _ENV_VARS},
          'jax_config': {k: repr(v) for k, v in sorted(jax.config.values.items())
                         if not any(s in k for s in _VOLATILE)},
          'source': source_digest()}


def executables_folder() -> Optional[str]:
  """Where :class:`Stored` keeps executables: under JAX's cache folder, None when it is off."""
  folder = jax.config.jax_compilation_cache_dir
  return os.path.join(folder, EXECUTABLES) if folder else None


def _signature(leaves, treedef) -> list:
  def leaf(x):
    aval = jax.typeof(x)
    return [list(aval.shape), str(aval.dtype), aval.weak_type, repr(getattr(x, 'sharding', None))]
  return [str(treedef)] + [leaf(x) for x in leaves]


class Stored:
  """A jitted function whose compiled programs are loaded, compiled ahead, or stored.

  Called with concrete arguments it runs the executable for their signature: loaded
  from ``folder`` when stored there, else compiled (and stored when freshly compiled).
  :meth:`prepare` starts that in a background thread from abstract arguments, so the
  program compiles while the caller does something else (the trainer: the initial
  state's own compilation). Under a trace (``jax.eval_shape``, another jit) it is
  ``jitted`` itself, as are its attributes (``lower``, ``trace``). Results are those of
  ``jitted``: the same program runs.

  Args:
    jitted: a ``jax.jit`` function.
    folder: the executables' folder (:func:`executables_folder`), or None to keep
      them in memory only.
    name: a file-name prefix, already a safe file name (e.g. 'pfl_resfim-round').
    what: JSON-able description of everything the program depends on that is not in
      the package source, the environment or the arguments (method, config, ...).
    compiler_options: XLA options of this program's compilation (``Lowered.compile``'s
      ``compiler_options``, e.g. ``{'xla_backend_optimization_level': 1}``); part of
      the stored program's key.
  """

  def __init__(self, jitted: Callable, folder: Optional[str], name: str, what,
               compiler_options: Optional[dict] = None):
    self.jitted, self.folder, self.name = jitted, folder, name
    self.compiler_options = dict(compiler_options or {})
    self._what = {'what': what, 'compiler_options': self.compiler_options}
    self._key = None
    self._lock = threading.Lock()
    self._programs: Dict[str, concurrent.futures.Future] = {}

  def __getattr__(self, attr):
    return getattr(self.jitted, attr)

  def _cache_size(self) -> int:
    """How many programs this function holds (jax.jit's counterpart counts its own)."""
    return len(self._programs)

  def __call__(self, *args):
    leaves, treedef = jax.tree.flatten(args)
    if any(isinstance(x, jax.core.Tracer) for x in leaves):
      return self.jitted(*args)
    return self._program(args, leaves, treedef, background=False).result()(*args)

  def compiled(self, *args) -> jax.stages.Compiled:
    """The compiled program for arguments like ``args`` (loaded, compiled, or the one
    already held: no second compilation), e.g. for its ``memory_analysis()``."""
    return self._program(args, *jax.tree.flatten(args), background=False).result()

  def prepare(self, *args) -> None:
    """Load or compile the program for arguments like ``args`` (arrays, or
    ``jax.ShapeDtypeStruct`` with the shardings the real ones will have) in a
    background thread; a later call with such arguments waits for it instead of
    compiling. Call it only for a program that will run: the process waits for the
    thread before it exits."""
    self._program(args, *jax.tree.flatten(args), background=True)

  def _program(self, args, leaves, treedef, background: bool) -> concurrent.futures.Future:
    sig = _digest(_signature(leaves, treedef))
    with self._lock:
      future = self._programs.get(sig)
      if future is not None:
        return future
      future = self._programs[sig] = concurrent.futures.Future()
    path = None
    if self.folder is not None:
      if self._key is None:
        self._key = _digest({'what': self._what, 'environment': environment()})
      path = os.path.join(self.folder, f'{self.name}-{_digest([self._key, sig])}.xla')

    def work():
      try:
        future.set_result((path and self._load(path)) or self._compile(path, args))
      except BaseException as e:   # handed to whoever calls with these arguments
        future.set_exception(e)
    if background:   # not a daemon: the interpreter must not exit in the middle of XLA
      threading.Thread(target=work, name=f'compile-{self.name}').start()
    else:
      work()
    return future

  @staticmethod
  def _load(path: str):
    if not os.path.exists(path):
      return None
    try:
      with open(path, 'rb') as f:
        payload, in_tree, out_tree, ids = pickle.loads(zlib.decompress(f.read()))
      # On the devices it was compiled for, in their order (by default every device of
      # the backend: a one-device program in a two-device process would expect two shards).
      by_id = {d.id: d for d in jax.devices()}
      return serialize_executable.deserialize_and_load(
          payload, in_tree, out_tree, execution_devices=[by_id[i] for i in ids])
    except Exception as e:   # a truncated or foreign file: compile instead
      log.warning('stored program %s unreadable (%s); removed, compiling it again', path, e)
      with contextlib.suppress(OSError):
        os.remove(path)
      return None

  def _compile(self, path: Optional[str], args):
    options = self.compiler_options or None
    if path is None:
      return self.jitted.lower(*args).compile(compiler_options=options)
    thread, hits = threading.get_ident(), []
    def listen(event, **kwargs):
      if event == '/jax/compilation_cache/cache_hits' and threading.get_ident() == thread:
        hits.append(event)
    jax.monitoring.register_event_listener(listen)
    try:
      compiled = self.jitted.lower(*args).compile(compiler_options=options)
    finally:
      jax.monitoring.unregister_event_listener(listen)
    if hits:   # XLA:CPU cannot serialize an executable it loaded: only fresh ones are kept
      log.info('%s came from JAX\'s cache; not stored again', self.name)
      return compiled
    try:
      # The devices it runs on, in order (AttributeError: a runtime without that answer).
      ids = [d.id for d in compiled.runtime_executable().local_devices()]
      blob = zlib.compress(pickle.dumps((*serialize_executable.serialize(compiled), ids)), 1)
      os.makedirs(self.folder, exist_ok=True)
      tmp = f'{path}.{os.getpid()}.tmp'
      with open(tmp, 'wb') as f:
        f.write(blob)
      os.replace(tmp, path)
    except (ValueError, NotImplementedError, OSError, pickle.PicklingError, AttributeError) as e:
      log.warning('compiled program %s not stored (%s)', self.name, e)
    return compiled
