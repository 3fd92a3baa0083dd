"""JAX's persistent compilation cache: a second run reuses the compiled programs.

Compiling the round is most of a short run's time on a CPU (the phantom's round compiles
for about 1.5 minutes), and the same shapes compile to the same program every time, so
the entry points keep XLA's executables on disk (config ``compile_cache``, default on)
under ``<data.cache_dir>/xla`` (``~/.cache/pflresfim_jax/xla`` by default). A program
loaded from the cache is the one that was compiled: results do not change.
"""
from __future__ import annotations

import os
from typing import Optional

import jax

from pflresfim_jax.data import loaders


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
