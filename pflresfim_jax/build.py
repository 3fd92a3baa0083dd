"""What a run is built from: the resolved config, the federation, the model, the
device data, the spectral bank, and each method's compiled round.

train.py (the loop), report.py, deploy.py and the experiments build through here;
nothing here imports them.
"""
from __future__ import annotations

import json
import re
from typing import Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pflresfim_jax import config as config_lib
from pflresfim_jax import checkpoint, compile_cache, methods, models, spectral
from pflresfim_jax.clients import engine, sharding
from pflresfim_jax.methods import fedrdn
from pflresfim_jax.config import METHODS
from pflresfim_jax.data import federation, phantom


def parse_methods(value) -> List[str]:
  """'all' (the built-in methods), one name, or a comma list -> method names.

  Each name must be registered (methods.names()) or a ``module:Class`` /
  ``file.py:Class`` spec, which is loaded here (methods.get).
  """
  names = list(METHODS) if str(value) == 'all' else [m.strip() for m in str(value).split(',') if m.strip()]
  for m in names:
    methods.get(m)
  if not names:
    raise ValueError('config.method is empty')
  return names


def parse_seeds(value) -> List[int]:
  """'0,1,2' or an int -> [0, 1, 2]."""
  try:
    seeds = [int(s) for s in str(value).replace(' ', '').split(',') if s != '']
  except ValueError:
    raise ValueError(f'config.seeds must be integers separated by commas, got {value!r}') from None
  if not seeds:
    raise ValueError('config.seeds is empty')
  return seeds


def method_folder(name: str) -> str:
  """A method's folder in a workdir: its name, with a ``module:Class`` or
  ``file.py:Class`` spec made a single safe file name."""
  return re.sub(r'[^A-Za-z0-9_.+-]+', '_', name)


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Fill the fields whose default depends on phantom vs real data (see config.py)."""
  config = ml_collections.ConfigDict(config.to_dict())  # a copy; placeholders become values
  config_lib.validate(config)   # every field, before anything is loaded or traced
  on_phantom = config.data.root is None and not config.data.clients
  if config.rounds is None:
    config.rounds = config.phantom.rounds if on_phantom else config.paper_rounds
  config_lib.first_recorded_round(config)   # eval.record_from fits the rounds
  if config.lr is None:
    config.lr = config.phantom.lr if on_phantom else config.paper_lr
  if config.model.base is None:
    config.model.base = config.phantom.model_base if on_phantom else config.model.paper_base
  parse_methods(config.method)
  parse_seeds(config.seeds)
  return config


def load_federation(config) -> federation.Federation:
  """The phantom when no data folder is given, else the real loaders."""
  from pflresfim_jax.data import loaders  # it imports PIL / nibabel only to read files
  if config.data.root is None and not config.data.clients:
    return phantom.load(seed=config.phantom.seed, image_size=config.phantom.image_size,
                        num_sites=config.phantom.num_sites, shift=config.phantom.shift,
                        cache_dir=loaders.cache_root(config))
  return loaders.load(config)


def model(config):
  """The segmentation model of config.model (and engine.precision)."""
  dtype = jnp.bfloat16 if config.engine.precision == 'bf16' else jnp.float32
  if config.model.name != 'unet':
    raise ValueError(f"model.name must be 'unet', got {config.model.name!r}")
  return models.UNet2D(base=config.model.base, dtype=dtype, levels=config.model.levels,
                       bias_init=config.model.bias_init, bn_unbiased=config.model.bn_unbiased,
                       conv=engine.resolve_conv(config.model.get('conv', 'auto')))


def device_data(fed: federation.Federation, mesh=None) -> Dict[str, Dict[str, jax.Array]]:
  """The splits as device arrays ``{split: {'image','label','count'}}``, client axis on ``mesh``.

  With a mesh of D devices the client axis is padded to a multiple of D with empty
  clients (count 0); see clients/sharding.py.
  """
  mesh = mesh or sharding.client_mesh(1)
  k_pad = sharding.padded_clients(fed.num_clients, mesh)
  return {s: sharding.put_clients(sharding.pad_clients(
      {'image': getattr(fed, s).images, 'label': getattr(fed, s).labels,
       'count': getattr(fed, s).counts}, k_pad), mesh) for s in federation.SPLITS}


def spectral_bank(fed: federation.Federation, config, mesh=None) -> Dict[str, jax.Array]:
  """The style bank (replicated): only low-frequency amplitude windows leave each client
  ('windows' [M, ...], 'owner' [M]), and each client's per-channel image mean and std
  ('channel_mean'/'channel_std' [num_clients, C]; read only by a method whose contract
  asks for them, FedRDN; a deployment sends them only then)."""
  windows, owner, stats = [], [], []
  for k in range(fed.num_clients):
    images, _ = fed.train.client(k)
    windows.append(spectral.amplitude_windows(images, config.spectral.ratio))
    owner.append(np.full(len(images), k, np.int32))
    stats.append(fedrdn.bank_entries(images))
  bank, owner = jnp.asarray(np.concatenate(windows)), jnp.asarray(np.concatenate(owner))
  if config.spectral.share == 'client_mean':
    bank, owner = spectral.client_mean_bank(bank, owner, fed.num_clients)
  out = {'windows': np.asarray(bank), 'owner': np.asarray(owner)}
  out.update({n: np.concatenate([s[n] for s in stats]) for n in stats[0]})
  # Host arrays: under jax.distributed each process places its own devices' copies.
  return jax.device_put(out, sharding.replicated(mesh or sharding.client_mesh(1)))


def bank_spec(fed: federation.Federation, config, mesh=None) -> Dict[str, jax.ShapeDtypeStruct]:
  """What :func:`spectral_bank` returns (shapes, dtypes, shardings) without computing it:
  a program can be prepared for the bank before the bank exists."""
  h, w, c = fed.image_shape
  b = spectral.low_freq_window((h, w), config.spectral.ratio)
  m = fed.num_clients if config.spectral.share == 'client_mean' else int(np.sum(fed.train.counts))
  one = sharding.replicated(mesh or sharding.client_mesh(1))
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=one)
  return {'windows': spec((m, 2 * b + 1, 2 * b + 1, c), jnp.float32), 'owner': spec((m,), jnp.int32),
          'channel_mean': spec((fed.num_clients, c), jnp.float32),
          'channel_std': spec((fed.num_clients, c), jnp.float32)}


def algorithm(config, method: str, num_clients: int, image_shape: Sequence[int], mesh=None
              ) -> methods.Algorithm:
  """methods.build for a run: ``num_clients`` stacked clients of ``image_shape`` images."""
  ctx = methods.Context(model(config), num_clients, tuple(image_shape), config, config.rounds,
                        mesh=mesh)
  return methods.build(method, ctx)


# The initial state's program on XLA:CPU: mostly random draws (every parameter's
# threefry), which LLVM's default optimisation level takes about 20 s to compile at
# the phantom's UNet and level 1 about 6 s (2-core AMD EPYC, 2026-12-04). It runs
# once, and its bits are the same: checked for every built-in method at the phantom's
# setting and in tests/test_build.py (level 0 would move them). The round keeps the
# default level (3): level 1 moves its floats.
INIT_OPTIONS = {'xla_backend_optimization_level': 1}


def init_options(platform: Optional[str] = None) -> Optional[dict]:
  """:data:`INIT_OPTIONS` on ``platform`` 'cpu' (default: JAX's default backend), else None."""
  return INIT_OPTIONS if (platform or jax.default_backend()) == 'cpu' else None


def init_program(init_fn) -> compile_cache.Stored:
  """``jax.jit(init_fn)`` compiled with :func:`init_options`, programs kept in memory (a
  deployment's): compiled as :func:`compile_method`'s, so it starts from the same bits."""
  return compile_cache.Stored(jax.jit(init_fn), None, 'init', {}, init_options())


def compile_method(config, fed: federation.Federation, method: str, mesh=None):
  """``(init, round)`` of ``method`` jitted: built once, reused for every seed.

  The client axis is padded to a multiple of the mesh size and split over it
  (clients/sharding.py). The round's metrics gain 'finite' [K]: whether every
  float in a client's state (parameters, personal model) and its training loss are
  finite. On a CPU the initial state compiles with :data:`INIT_OPTIONS`.
  """
  mesh = mesh or sharding.client_mesh(1)
  algo = algorithm(config, method, sharding.padded_clients(fed.num_clients, mesh),
                   fed.image_shape, mesh)

  def checked_round(state, data, bank, key, rnd):
    state, metrics = algo.round(state, data, bank, key, rnd)
    def finite(tree):
      leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
      return jax.vmap(lambda *xs: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs])))(*leaves)
    ok = finite({'p': state['params'], 'v': state['personal']}) & jnp.isfinite(metrics['train_loss'])
    return state, {**metrics, 'finite': ok}
  # The state keeps its client axis split over the mesh from round to round (constant
  # leaves included), so every round after the first reuses the compiled program.
  init = jax.jit(algo.init, out_shardings=sharding.split(mesh))
  # Metrics come back replicated: every process (jax.distributed) can read them.
  round_fn = jax.jit(checked_round, donate_argnums=(0,),
                     out_shardings=(sharding.split(mesh), sharding.replicated(mesh)))
  name, folder = method_folder(method), _programs_folder(config, method)
  what = {'method': method, 'clients': sharding.padded_clients(fed.num_clients, mesh),
          'image_shape': list(fed.image_shape), 'mesh': repr(mesh),
          'config': program_config(config)}
  init = compile_cache.Stored(init, folder, f'{name}-init', what,
                              init_options(mesh.devices.flat[0].platform))
  if jax.process_count() > 1:   # each process compiles its own round: plain jit
    return init, round_fn
  return init, compile_cache.Stored(round_fn, folder, f'{name}-round', what)


def predict_program(config, method: str, num_clients: int, image_shape: Sequence[int]
                    ) -> compile_cache.Stored:
  """``algorithm(...).predict`` jitted on one device (a report's pictures), kept with the
  stored programs as :func:`compile_method`'s are: a cached run's report loads it
  instead of tracing and compiling the UNet's forward pass again."""
  algo = algorithm(config, method, num_clients, image_shape)
  what = {'method': method, 'clients': num_clients, 'image_shape': list(image_shape),
          'config': program_config(config)}
  return compile_cache.Stored(jax.jit(algo.predict), _programs_folder(config, method),
                              f'{method_folder(method)}-predict', what)


def _programs_folder(config, method: str) -> Optional[str]:
  """Where ``method``'s compiled programs are stored on disk, or None (kept in memory).

  Stored only with ``config.compile_cache`` on, in a single process, and for the
  package's own methods: a method from elsewhere may import code that the stored
  programs' key (the package source) does not cover.
  """
  store = config.get('compile_cache', True) and methods.builtin(method) and jax.process_count() == 1
  return compile_cache.executables_folder() if store else None


def program_config(config) -> dict:
  """``config`` as a flat dict without the fields that change no compiled program
  (checkpoint.RESUME_IGNORES: seeds, reporting, checkpoints, caches; and which rounds
  record test metrics, eval.record_from: the trainer's bookkeeping)."""
  flat = checkpoint.flatten(json.loads(config.to_json_best_effort()))
  ignored = (*checkpoint.RESUME_IGNORES, 'eval.record_from')
  return {k: v for k, v in flat.items() if not any(k == i or k.startswith(i + '.') for i in ignored)}
