"""The training loop: ``train_and_evaluate(config, workdir)``.

Resolves the config (phantom or real data), builds the federation and the spectral
bank once, then for every method and seed jits one round function and runs it for
T rounds. Per round it writes a JSON line; at the end a results table (rows =
methods, columns = clients + mean; test Dice in %, mean +- std over seeds) printed
and written as Markdown and CSV.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import importlib
import json
import logging
import os
import sys
import time
from typing import Any, Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pflresfim_jax import build, checkpoint, config as config_lib, distributed, methods
from pflresfim_jax.stopping import Interrupted, StopFlag  # noqa: F401 (train.Interrupted is the API)
from pflresfim_jax.clients import engine, sharding
from pflresfim_jax.data import federation

log = logging.getLogger('pflresfim_jax')


def default_workdir(config) -> str:
  """``runs/<data name>-<method>`` (phantom runs: ``runs/phantom-<method>``)."""
  data = 'phantom' if config.data.root is None and not config.data.clients else config.data.name
  return os.path.join('runs', f'{data}-{build.method_folder(str(config.method).replace(",", "+"))}')


class Progress:
  """A one-line progress bar on a terminal; one log line per round otherwise (``stream``
  None: silent)."""

  def __init__(self, total: int, label: str, stream=sys.stderr):
    self.total, self.label, self.stream = total, label, stream
    self.tty = hasattr(stream, 'isatty') and stream.isatty()
    self.start = time.time()

  def update(self, done: int, text: str):
    if self.stream is None:   # silent (processes other than 0 under jax.distributed)
      return
    bar = '#' * int(20 * done / self.total)
    line = f'{self.label} [{bar:<20}] {done}/{self.total} {text} ({time.time() - self.start:.0f}s)'
    if self.tty:
      self.stream.write('\r' + line + ('\n' if done == self.total else ''))
      self.stream.flush()
    else:
      print(line, file=self.stream, flush=True)


class Diverged(FloatingPointError):
  """A loss or a parameter became NaN/Inf; the last good checkpoint is kept."""


def _event_writer(config, run_dir: str):
  """A TensorBoard writer (tensorboardX or torch's) or None: config.tensorboard."""
  mode = str(config.tensorboard).lower()
  if mode == 'false':
    return None
  for module in ('tensorboardX', 'torch.utils.tensorboard'):
    try:
      return importlib.import_module(module).SummaryWriter(os.path.join(run_dir, 'tensorboard'))
    except ImportError:
      continue
  if mode == 'true':
    raise ValueError('config.tensorboard=true needs tensorboardX (pip install tensorboardX)')
  return None


def _write_atomic(path: str, text: str) -> None:
  if not distributed.is_main():
    return
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _keep_lines(path: str, n: int) -> None:
  """Cut ``path`` to its first ``n`` lines (rounds after a checkpoint are redone)."""
  lines = open(path).read().splitlines(keepends=True)[:n] if os.path.exists(path) else []
  _write_atomic(path, ''.join(lines))


def _round_record(method, seed, rnd, m) -> Dict:
  record = {'round': rnd, 'method': method, 'seed': seed,
            'train_loss': m['train_loss'].tolist(),
            'val': {n: v.tolist() for n, v in m['val'].items()},
            'test': {n: v.tolist() for n, v in m['test'].items()},
            'local_fraction': m['local_fraction'].tolist()}
  for extra in ('collaborators', 'layer_fraction', 'mask_overlap', 'mask_kept'):
    if extra in m:
      record[extra] = jax.tree.map(lambda v: v.tolist(), m[extra])
  return record


def _start(ckpt, init_fn, seed: int, k: int, bank, mesh, metrics_path: str, what: str):
  """A run's first round and state: fresh, or after the latest checkpoint.

  Returns (first round to train, state, run key, bank, (best val Dice [K], its round [K],
  test metrics recorded there)); metrics.jsonl is cut to the rounds kept.
  """
  k_init, k_run = methods.run_keys(seed)
  start = ckpt.latest()
  if start is None:
    _keep_lines(metrics_path, 0)
    return 0, init_fn(k_init), k_run, bank, (np.full(k, -1.0, np.float32), np.full(k, -1), {})
  slots = int(ckpt.meta(start).get('clients_padded', sharding.padded_clients(k, mesh)))
  if slots != sharding.padded_clients(k, mesh):
    ckpt.close()
    raise ValueError(
        f'{ckpt.directory} holds {slots} client slots ({k} clients padded for the devices it '
        f'ran on), but {mesh.size} device(s) pad them to {sharding.padded_clients(k, mesh)}: '
        'resume with config.engine.devices set to a count that pads to the same number, or '
        'start fresh with --config.resume=false')
  abstract = {'fed': sharding.abstract(jax.eval_shape(init_fn, k_init), sharding.split(mesh)),
              'key': sharding.abstract(k_run, sharding.replicated(mesh))}
  saved, bank, meta = ckpt.restore(abstract, sharding.abstract(bank, sharding.replicated(mesh)))
  best = (np.asarray(meta['best_val'], np.float32), np.asarray(meta['best_round']),
          {n: np.asarray(v, np.float32) for n, v in meta['recorded'].items()})
  _keep_lines(metrics_path, start + 1)
  log.warning('%s: resuming after round %d from %s', what, start, ckpt.directory)
  return start + 1, saved['fed'], jnp.asarray(np.asarray(saved['key'])), bank, best


def _check_finite(m, clients, ckpt, what: str) -> None:
  """Raise Diverged naming the clients whose loss or state is not finite."""
  if m['finite'].all():
    return
  bad = [clients[i] for i in np.flatnonzero(~m['finite'])]
  last = ckpt.latest()
  raise Diverged(
      f'{what}: non-finite loss or parameters on client(s) {", ".join(bad)}; the last good '
      'checkpoint ' + (f'(after round {last}) is kept in {ckpt.directory}' if last is not None
                       else 'does not exist (no round finished cleanly)')
      + '; lower config.lr or check the data')


def _log_scalars(writer, m, clients, rnd: int) -> None:
  writer.add_scalar('val/dice_mean', float(m['val']['dice'].mean()), rnd)
  writer.add_scalar('train/loss_mean', float(m['train_loss'].mean()), rnd)
  for i, c in enumerate(clients):
    writer.add_scalar(f'val/dice/{c}', float(m['val']['dice'][i]), rnd)
    writer.add_scalar(f'local_fraction/{c}', float(m['local_fraction'][i]), rnd)


def _save(ckpt, rnd: int, k_run, bank, mesh, meta, state) -> str:
  """Write the checkpoint taken after round ``rnd``; returns its folder."""
  # The run key is saved replicated over the mesh (every process holds it).
  key = jax.device_put(np.asarray(k_run), sharding.replicated(mesh))
  ckpt.save(rnd, {'fed': state, 'key': key}, bank, meta)
  return ckpt.directory


def _host_saver(save, state):
  """What a stop signal may call while the next round runs (see stopping.py): ``save``
  of a host copy of ``state`` (the round program donates its input: the device arrays
  will be gone). None in a multi-process run, where no process holds the whole state."""
  if jax.process_count() > 1:
    return None
  return functools.partial(save, jax.tree.map(np.array, state))   # a copy, not a view


def run_one(config, fed: federation.Federation, method: str, seed: int, workdir: str,
            data=None, bank=None, compiled=None, stop: StopFlag | None = None, mesh=None
            ) -> Dict[str, np.ndarray]:
  """Train one method with one seed (resuming from ``workdir``'s checkpoints).

  Test metrics are recorded for a client whenever its val Dice improves in the
  second half of training (rounds T//2 .. T-1, METHOD.md 7; from T//2 + 1 under
  ``eval.record_from='after_half'``: config.first_recorded_round). A finished run
  (``result.json`` present) is not trained again.

  Raises:
    Diverged: a client's loss or parameters became NaN/Inf (names round and client).
    Interrupted: ``stop`` was requested; a checkpoint of the last round was written.

  Returns:
    dict with 'test_dice' [K] (in %), the other test metrics, 'best_round' [K], and
    'final_val_dice' [K].
  """
  os.makedirs(workdir, exist_ok=True)
  done = os.path.join(workdir, 'result.json')
  if os.path.exists(done):
    with open(done) as f:
      saved = json.load(f)
    log.warning('%s seed %d: finished earlier (%s), not retrained', method, seed, done)
    return {n: np.asarray(v, np.int64 if n == 'best_round' else np.float32) for n, v in saved.items()}
  mesh = mesh or sharding.client_mesh(1)
  data = build.device_data(fed, mesh) if data is None else data
  bank = build.spectral_bank(fed, config, mesh) if bank is None else bank
  init_fn, round_fn = compiled or build.compile_method(config, fed, method, mesh)
  k = fed.num_clients
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), config.checkpoint.every,
                                 config.checkpoint.keep)
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  start, state, k_run, bank, (best_val, best_round, recorded) = _start(
      ckpt, init_fn, seed, k, bank, mesh, metrics_path, f'{method} seed {seed}')
  mesh_clients = sharding.padded_clients(k, mesh)
  first_recorded = config_lib.first_recorded_round(config)
  main = distributed.is_main()
  writer = _event_writer(config, workdir) if main else None
  progress = Progress(config.rounds, f'{method} seed {seed}', stream=sys.stderr if main else None)
  last_val = None
  try:
    with open(metrics_path if main else os.devnull, 'a') as out:
      for rnd in range(start, config.rounds):
        if stop is not None and stop.requested:   # asked during an earlier method or seed
          raise Interrupted(f'{method} seed {seed}: stopped before round {rnd}; run the same '
                            'command again to resume', stop.signum)
        state, metrics = round_fn(state, data, bank, jax.random.fold_in(k_run, rnd), jnp.int32(rnd))
        m = jax.tree.map(lambda v: np.asarray(v)[:k], metrics)  # padded clients dropped
        _check_finite(m, fed.clients, ckpt, f'{method} seed {seed}: round {rnd}')
        with stop.round_end() if stop is not None else contextlib.nullcontext():
          last_val = m['val']['dice']
          if rnd >= first_recorded:
            best_val, best_round, recorded = _record(rnd, m, best_val, best_round, recorded)
          out.write(json.dumps(_round_record(method, seed, rnd, m)) + '\n')
          out.flush()
          if writer is not None:
            _log_scalars(writer, m, fed.clients, rnd)
          meta = {'round': rnd, 'method': method, 'seed': seed, 'clients_padded': mesh_clients,
                  'best_val': best_val.tolist(), 'best_round': best_round.tolist(),
                  'recorded': {n: v.tolist() for n, v in recorded.items()}}
          save = functools.partial(_save, ckpt, rnd, k_run, bank, mesh, meta)
          due = ckpt.due(rnd, config.rounds) or (stop is not None and stop.requested)
          if due:
            save(state)
          if stop is not None:
            stop.remember((lambda: ckpt.directory) if due else _host_saver(save, state))
        progress.update(rnd + 1, f'val Dice {100 * last_val.mean():.1f}')
        if stop is not None and stop.requested and rnd < config.rounds - 1:
          with stop.round_end():   # the signal came after this round's checkpoint decision
            save(state)            # (no-op when on disk)
          raise Interrupted(f'{method} seed {seed}: stopped after round {rnd}; checkpoint in '
                            f'{ckpt.directory}; run the same command again to resume', stop.signum)
  finally:
    if stop is not None:
      stop.forget()         # the checkpointer closes: nothing more to save from here
    ckpt.close()
    if writer is not None:
      writer.close()
  return _finish(done, recorded, best_round, last_val, metrics_path)


def _record(rnd: int, m: Dict[str, Any], best_val: np.ndarray, best_round: np.ndarray,
            recorded: Dict[str, np.ndarray]):
  """METHOD.md 7 after round ``rnd`` (inside the recording window): each client whose
  val Dice beats its best so far (strictly) takes this round's test metrics.

  Args:
    rnd: the round.
    m: the round's host metrics ({'val': {'dice': [K]}, 'test': {name: [K]}}).
    best_val, best_round: [K] so far (both start at -1).
    recorded: {name: [K]} test metrics recorded so far ({} before the first).

  Returns:
    (best_val, best_round, recorded), updated.
  """
  better = m['val']['dice'] > best_val
  return (np.where(better, m['val']['dice'], best_val), np.where(better, rnd, best_round),
          {n: np.where(better, v, recorded.get(n, v)) for n, v in m['test'].items()})


def _finish(done: str, recorded, best_round, last_val, metrics_path: str) -> Dict[str, np.ndarray]:
  """run_one's result (test metrics in %, best_round, final_val_dice in %), written to
  ``done`` (result.json); ``last_val`` None (nothing trained after a resume) is read
  from the last line of metrics.jsonl."""
  result = {f'test_{n}': 100 * v for n, v in recorded.items()}
  result['best_round'] = best_round
  if last_val is None:
    with open(metrics_path) as f:
      last_val = json.loads(f.read().splitlines()[-1])['val']['dice']
  result['final_val_dice'] = 100 * np.asarray(last_val, np.float32)
  _write_atomic(done, json.dumps({n: v.tolist() for n, v in result.items()}))
  return result


def dice_cells(per_seed: Sequence[np.ndarray]) -> Tuple[List[str], List[str]]:
  """Table cells (Markdown, CSV) for per-seed [K] Dice arrays: K clients + the mean.

  Each cell is mean +- std over seeds (std omitted with one seed).
  """
  arr = np.stack(per_seed)                    # [S, K]
  arr = np.concatenate([arr, arr.mean(1, keepdims=True)], 1)
  mean, std = arr.mean(0), arr.std(0)
  if len(per_seed) > 1:
    return ([f'{m:.2f} ± {s:.2f}' for m, s in zip(mean, std)],
            [f'{m:.2f}±{s:.2f}' for m, s in zip(mean, std)])
  cells = [f'{m:.2f}' for m in mean]
  return cells, cells


def results_table(clients: Sequence[str], rows: Dict[str, List[np.ndarray]]) -> Dict[str, str]:
  """Markdown and CSV of test Dice: rows = methods, columns = clients + mean (see dice_cells)."""
  header = ['method', *clients, 'mean']
  md = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  csv = [','.join(header)]
  for method, per_seed in rows.items():
    md_cells, csv_cells = dice_cells(per_seed)
    md.append('| ' + ' | '.join([method, *md_cells]) + ' |')
    csv.append(','.join([method, *csv_cells]))
  return {'md': '\n'.join(md) + '\n', 'csv': '\n'.join(csv) + '\n'}


def prepare_workdir(config, workdir: str) -> str:
  """Check ``workdir`` before any training; returns the folder the run will use.

  A workdir that already holds a run (config.json and some metrics) is resumed when the configs
  agree on every field that changes results (checkpoint.RESUME_IGNORES aside);
  otherwise this raises naming the differing fields. With ``config.resume=False``
  the run starts fresh in ``<workdir>/run-<n>`` and nothing old is touched.
  """
  if jax.process_count() > 1 and not config.resume:
    raise ValueError('config.resume=false picks a fresh run-<n> folder per process; with '
                     'config.distributed pass a new --workdir instead')
  if distributed.is_main():
    checkpoint.check_writable(workdir)
  saved_path = os.path.join(workdir, 'config.json')
  now = json.loads(config.to_json_best_effort())
  # Only a workdir with training output counts as a run (a config.json left by a run
  # that stopped on a data or config error is simply replaced).
  trained = glob.glob(os.path.join(workdir, '*', 'seed*', 'metrics.jsonl'))
  if os.path.exists(saved_path) and trained:
    if not config.resume:
      workdir = checkpoint.fresh_subfolder(workdir)
      log.warning('config.resume=false: starting a fresh run in %s', workdir)
      checkpoint.check_writable(workdir)
    else:
      try:
        with open(saved_path) as f:
          saved = json.load(f)
      except (OSError, ValueError) as e:
        raise ValueError(f'{saved_path} is unreadable ({e}); pass --config.resume=false to start '
                         'a fresh run beside it, or another --workdir') from None
      defaults = json.loads(config_lib.base_config().to_json_best_effort())
      diff = checkpoint.config_diff(saved, now, defaults=defaults)
      if diff:
        raise ValueError(f'{workdir} holds a run with another config, so it cannot be resumed:\n  '
                         + '\n  '.join(diff) + '\npass --config.resume=false to start a fresh run '
                         f'in a subfolder of {workdir} (nothing is deleted), or another --workdir')
  _write_atomic(os.path.join(workdir, 'config.json'),
                config.to_json_best_effort(indent=2, sort_keys=True))
  return workdir


def _train_methods(config, fed, workdir: str, data, mesh, stop: StopFlag):
  """Every method and seed of ``config`` (run_one each); results.md/csv are rewritten
  after every method, so partial results survive. Returns (results, tables)."""
  seeds = build.parse_seeds(config.seeds)
  rows: Dict[str, List[np.ndarray]] = {}
  results: Dict[str, Dict] = {}
  bank = None
  for method in build.parse_methods(config.method):
    compiled = build.compile_method(config, fed, method, mesh)
    abstract_state = compiled[0].eval_shape(jax.random.PRNGKey(0))   # with its shardings
    state_bytes = checkpoint.tree_bytes(abstract_state)
    if distributed.is_main():
      checkpoint.check_writable(workdir, len(seeds) * (config.checkpoint.keep + 1) * state_bytes)
    folders = [os.path.join(workdir, build.method_folder(method), f'seed{s}') for s in seeds]
    if hasattr(compiled[1], 'prepare') and not all(
        os.path.exists(os.path.join(f, 'result.json')) for f in folders):
      # the round compiles (or loads) while the bank is built and the initial state
      # compiles (run_one calls both)
      compiled[1].prepare(abstract_state, data, build.bank_spec(fed, config, mesh),
                          methods.run_keys(seeds[0])[1], jnp.int32(0))
    bank = build.spectral_bank(fed, config, mesh) if bank is None else bank
    per_seed = [run_one(config, fed, method, seed, folder, data, bank, compiled, stop, mesh)
                for seed, folder in zip(seeds, folders)]
    rows[method] = [r['test_dice'] for r in per_seed]
    results[method] = {'per_seed': per_seed}
    tables = results_table(fed.clients, rows)
    for ext in ('md', 'csv'):
      _write_atomic(os.path.join(workdir, f'results.{ext}'), tables[ext])
  return results, tables


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Dict]:
  """Run every requested method and seed; write results.md / results.csv in ``workdir``.

  Re-running with the same workdir resumes from checkpoints and skips finished runs
  (see prepare_workdir). At the end, report.md / report.html (config.report).

  Returns:
    {'workdir': the folder used, 'clients': names, 'methods': {method: {'per_seed': [run_one results]}},
     'tables': {'md', 'csv'} of the results table}.
  """
  config = build.resolve(config)
  workdir = prepare_workdir(config, workdir)
  on_phantom = config.data.root is None and not config.data.clients
  if on_phantom:
    log.warning('no data.root given: running the built-in phantom (%d sites, %dx%d images, '
                '%d rounds, UNet base %d); pass --config.data.root=/path for real data',
                config.phantom.num_sites, config.phantom.image_size, config.phantom.image_size,
                config.rounds, config.model.base)
  fed = build.load_federation(config)
  log.warning('%s', fed.summary())
  mesh = sharding.client_mesh(config.engine.devices)
  log.warning('JAX backend %s, client axis %s, %d device(s) (%d clients padded to %d)',
              jax.default_backend(), engine.resolve_client_axis(config.engine.client_axis),
              mesh.size, fed.num_clients, sharding.padded_clients(fed.num_clients, mesh))
  data = build.device_data(fed, mesh)
  with StopFlag(config.checkpoint.stop_grace) as stop:
    results, tables = stop.run(_train_methods, config, fed, workdir, data, mesh, stop)
  if not distributed.is_main():
    return {'workdir': workdir, 'clients': list(fed.clients), 'methods': results, 'tables': tables}
  print(f'\nTest Dice (%) per client, recorded at the best val Dice of rounds '
        f'{config_lib.first_recorded_round(config)}..{config.rounds - 1}:\n')
  print(tables['md'])
  written = [os.path.join(workdir, 'results.md'), 'results.csv', '<method>/seed<k>/metrics.jsonl']
  if config.report.enabled and jax.process_count() > 1:
    log.warning('report skipped in a multi-process run: draw it on one process with '
                'python experiments/report.py --workdir=%s', workdir)
  elif config.report.enabled:
    from pflresfim_jax import report  # matplotlib only when a report is drawn
    written.insert(1, os.path.basename(report.build(workdir, config=config, fed=fed)))
  print('written: ' + ', '.join(written))
  return {'workdir': workdir, 'clients': list(fed.clients), 'methods': results, 'tables': tables}
