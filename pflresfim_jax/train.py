"""The training loop: ``train_and_evaluate(config, workdir)``.

Resolves the config (phantom or real data), builds the federation and the spectral
bank once, then for every method and seed jits one round function and runs it for
T rounds. Per round it writes a JSON line; at the end a results table (rows =
methods, columns = clients + mean; test Dice in %, mean +- std over seeds) printed
and written as Markdown and CSV.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Dict, List, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pflresfim_jax import methods, models, spectral
from pflresfim_jax.clients import engine
from pflresfim_jax.config import METHODS
from pflresfim_jax.data import federation
from pflresfim_jax.data import phantom

log = logging.getLogger('pflresfim_jax')


def parse_methods(value) -> List[str]:
  """'all', one name, or a comma list -> list of method names (checked)."""
  names = list(METHODS) if str(value) == 'all' else [m.strip() for m in str(value).split(',') if m.strip()]
  for m in names:
    if m not in METHODS:
      raise ValueError(f'config.method: unknown method {m!r}; choose from {", ".join(METHODS)} or all')
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


def default_workdir(config) -> str:
  """``runs/<data name>-<method>`` (phantom runs: ``runs/phantom-<method>``)."""
  data = 'phantom' if config.data.root is None and not config.data.clients else config.data.name
  return os.path.join('runs', f'{data}-{str(config.method).replace(",", "+")}')


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Fill the fields whose default depends on phantom vs real data (see config.py)."""
  config = ml_collections.ConfigDict(config.to_dict())  # a copy; placeholders become values
  on_phantom = config.data.root is None and not config.data.clients
  if config.rounds is None:
    config.rounds = config.phantom.rounds if on_phantom else config.paper_rounds
  if config.model.base is None:
    config.model.base = config.phantom.model_base if on_phantom else config.model.paper_base
  if config.rounds < 1:
    raise ValueError(f'config.rounds must be >= 1, got {config.rounds}')
  if config.engine.precision not in ('fp32', 'bf16'):
    raise ValueError(f"engine.precision must be 'fp32' or 'bf16', got {config.engine.precision!r}")
  if config.spectral.share not in ('per_image', 'client_mean'):
    raise ValueError(f"spectral.share must be 'per_image' or 'client_mean', got {config.spectral.share!r}")
  parse_methods(config.method)
  parse_seeds(config.seeds)
  return config


def load_federation(config) -> federation.Federation:
  """The phantom when no data folder is given, else the real loaders."""
  if config.data.root is None and not config.data.clients:
    return phantom.load(seed=config.phantom.seed, image_size=config.phantom.image_size,
                        num_sites=config.phantom.num_sites)
  from pflresfim_jax.data import loaders  # PIL / nibabel only when real data is read
  return loaders.load(config)


def build_model(config):
  dtype = jnp.bfloat16 if config.engine.precision == 'bf16' else jnp.float32
  if config.model.name != 'unet':
    raise ValueError(f"model.name must be 'unet', got {config.model.name!r}")
  return models.UNet2D(base=config.model.base, dtype=dtype)


def device_data(fed: federation.Federation) -> Dict[str, Dict[str, jax.Array]]:
  """The federation's splits as device arrays: {split: {'image','label','count'}}."""
  return {s: {'image': jnp.asarray(getattr(fed, s).images),
              'label': jnp.asarray(getattr(fed, s).labels),
              'count': jnp.asarray(getattr(fed, s).counts)} for s in federation.SPLITS}


def build_bank(fed: federation.Federation, config) -> Dict[str, jax.Array]:
  """The spectral bank: only low-frequency amplitude windows leave each client."""
  windows, owner = [], []
  for k in range(fed.num_clients):
    images, _ = fed.train.client(k)
    windows.append(np.asarray(spectral.amplitude_bank(jnp.asarray(images), config.spectral.ratio)))
    owner.append(np.full(len(images), k, np.int32))
  bank, owner = jnp.asarray(np.concatenate(windows)), jnp.asarray(np.concatenate(owner))
  if config.spectral.share == 'client_mean':
    bank, owner = spectral.client_mean_bank(bank, owner, fed.num_clients)
  return {'windows': bank, 'owner': owner}


class Progress:
  """A one-line progress bar on a terminal; one log line per round otherwise."""

  def __init__(self, total: int, label: str, stream=sys.stderr):
    self.total, self.label, self.stream = total, label, stream
    self.tty = hasattr(stream, 'isatty') and stream.isatty()
    self.start = time.time()

  def update(self, done: int, text: str):
    bar = '#' * int(20 * done / self.total)
    line = f'{self.label} [{bar:<20}] {done}/{self.total} {text} ({time.time() - self.start:.0f}s)'
    if self.tty:
      self.stream.write('\r' + line + ('\n' if done == self.total else ''))
      self.stream.flush()
    else:
      print(line, file=self.stream, flush=True)


def compile_method(config, fed: federation.Federation, method: str):
  """``(init, round)`` of ``method`` jitted: built once, reused for every seed."""
  ctx = methods.Context(build_model(config), fed.num_clients, fed.image_shape, config,
                        config.rounds)
  algo = methods.build(method, ctx)
  return jax.jit(algo.init), jax.jit(algo.round, donate_argnums=(0,))


def run_one(config, fed: federation.Federation, method: str, seed: int, workdir: str,
            data=None, bank=None, compiled=None) -> Dict[str, np.ndarray]:
  """Train one method with one seed; returns per-client recorded test metrics.

  Test metrics are recorded for a client whenever its val Dice improves in the
  second half of training (rounds T//2 .. T-1), METHOD.md 7.

  Returns:
    dict with 'test_dice' [K] (in %), the other test metrics, 'best_round' [K], and
    'final_val_dice' [K].
  """
  os.makedirs(workdir, exist_ok=True)
  data = device_data(fed) if data is None else data
  bank = build_bank(fed, config) if bank is None else bank
  init_fn, round_fn = compiled or compile_method(config, fed, method)
  k_init, k_run = jax.random.split(jax.random.PRNGKey(seed))
  state = init_fn(k_init)
  k = fed.num_clients
  best_val = np.full(k, -np.inf)
  recorded: Dict[str, np.ndarray] = {}
  best_round = np.full(k, -1)
  half = config.rounds // 2
  progress = Progress(config.rounds, f'{method} seed {seed}')
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as out:
    for rnd in range(config.rounds):
      state, metrics = round_fn(state, data, bank, jax.random.fold_in(k_run, rnd), jnp.int32(rnd))
      m = jax.tree.map(np.asarray, metrics)
      val_dice = m['val']['dice']
      if rnd >= half:
        better = val_dice > best_val
        best_val = np.where(better, val_dice, best_val)
        best_round = np.where(better, rnd, best_round)
        for name, v in m['test'].items():
          recorded[name] = np.where(better, v, recorded.get(name, v))
      record = {'round': rnd, 'method': method, 'seed': seed,
                'train_loss': m['train_loss'].tolist(),
                'val': {n: v.tolist() for n, v in m['val'].items()},
                'test': {n: v.tolist() for n, v in m['test'].items()},
                'local_fraction': m['local_fraction'].tolist()}
      if 'collaborators' in m:
        record['collaborators'] = m['collaborators'].tolist()
      out.write(json.dumps(record) + '\n')
      out.flush()
      progress.update(rnd + 1, f'val Dice {100 * val_dice.mean():.1f}')
  result = {f'test_{n}': 100 * v for n, v in recorded.items()}
  result['best_round'] = best_round
  result['final_val_dice'] = 100 * val_dice
  return result


def results_table(clients: Sequence[str], rows: Dict[str, List[np.ndarray]]) -> Dict[str, str]:
  """Markdown and CSV of test Dice: rows = methods, columns = clients + mean.

  Each cell is mean +- std over seeds (std omitted with one seed).
  """
  header = ['method', *clients, 'mean']
  md = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  csv = [','.join(header)]
  for method, per_seed in rows.items():
    arr = np.stack(per_seed)                    # [S, K]
    arr = np.concatenate([arr, arr.mean(1, keepdims=True)], 1)
    mean, std = arr.mean(0), arr.std(0)
    if len(per_seed) > 1:
      cells = [f'{m:.2f} ± {s:.2f}' for m, s in zip(mean, std)]
      csv_cells = [f'{m:.2f}±{s:.2f}' for m, s in zip(mean, std)]
    else:
      cells = csv_cells = [f'{m:.2f}' for m in mean]
    md.append('| ' + ' | '.join([method, *cells]) + ' |')
    csv.append(','.join([method, *csv_cells]))
  return {'md': '\n'.join(md) + '\n', 'csv': '\n'.join(csv) + '\n'}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Dict]:
  """Run every requested method and seed; write results.md / results.csv in ``workdir``.

  Returns:
    {method: {'per_seed': [result dicts of run_one], 'tables': {...}}}.
  """
  config = resolve(config)
  os.makedirs(workdir, exist_ok=True)
  on_phantom = config.data.root is None and not config.data.clients
  if on_phantom:
    log.warning('no data.root given: running the built-in phantom (%d sites, %dx%d images, '
                '%d rounds, UNet base %d); pass --config.data.root=/path for real data',
                config.phantom.num_sites, config.phantom.image_size, config.phantom.image_size,
                config.rounds, config.model.base)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  fed = load_federation(config)
  log.warning('%s', fed.summary())
  log.warning('JAX backend %s, client axis %s', jax.default_backend(),
              engine.resolve_client_axis(config.engine.client_axis))
  data, bank = device_data(fed), build_bank(fed, config)
  rows: Dict[str, List[np.ndarray]] = {}
  results = {}
  for method in parse_methods(config.method):
    per_seed = []
    compiled = compile_method(config, fed, method)
    for seed in parse_seeds(config.seeds):
      res = run_one(config, fed, method, seed, os.path.join(workdir, method, f'seed{seed}'),
                    data, bank, compiled)
      per_seed.append(res)
    rows[method] = [r['test_dice'] for r in per_seed]
    results[method] = {'per_seed': per_seed}
    tables = results_table(fed.clients, rows)  # rewritten after every method: partial results survive
    for ext in ('md', 'csv'):
      with open(os.path.join(workdir, f'results.{ext}'), 'w') as f:
        f.write(tables[ext])
  print(f'\nTest Dice (%) per client, recorded at the best val Dice of rounds '
        f'{config.rounds // 2}..{config.rounds - 1}:\n')
  print(tables['md'])
  print(f'written: {os.path.join(workdir, "results.md")}, results.csv, <method>/seed<k>/metrics.jsonl')
  return results
