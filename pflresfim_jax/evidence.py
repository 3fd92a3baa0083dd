"""Does ResFIM's residual find the parameters to keep local? ``run(config, workdir, out)``.

The grid (every cell an ordinary workdir under ``workdir``, run by
``train.train_and_evaluate``: finished runs are skipped, interrupted ones resume)::

    <shift>/baselines          fedavg, fedbn, local, fedcac, pfl_resfim   every seed
    <shift>/pfl_resfim-<sel>   pfl_resfim with resfim.selector=<sel>      every seed
    placement/<sel>            pfl_resfim, <sel>, resfim.scope='global'   first seed, first shift

for each shift of :data:`SHIFTS` (the phantom's controlled shifts) and each selector of
``selectors.SELECTORS`` ('residual' is the baselines cell's pfl_resfim). Under the
default 'tensor' scope every layer keeps the same fraction local, so where a selector
puts its entries is only visible in 'global' scope: the placement cells.

``out`` (docs/evidence.md) gets: test Dice per client (mean +- std over seeds), mean val
Dice over rounds (and a PNG of the curves per shift), the masks' stability from round to
round and agreement between clients, and the per-layer placement.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import ml_collections
import numpy as np

from pflresfim_jax import build, config as config_lib, report, selectors, sweep, train

log = logging.getLogger('pflresfim_jax')

SHIFTS = ('style', 'mixed')
BASELINES = ('fedavg', 'fedbn', 'local', 'fedcac', 'pfl_resfim')
Cell = Tuple[str, Dict[str, object]]


def grid(config: ml_collections.ConfigDict, shifts: Sequence[str] = SHIFTS,
         baselines: Sequence[str] = BASELINES,
         selector_names: Sequence[str] = selectors.SELECTORS,
         placement: Optional[Sequence[str]] = None) -> List[Cell]:
  """``[(cell folder, config overrides)]`` in run order (see the module docstring);
  ``placement``: the selectors of the placement cells (None: ``selector_names``)."""
  cells: List[Cell] = []
  for shift in shifts:
    cells.append((f'{shift}/baselines', {'phantom.shift': shift, 'method': ','.join(baselines)}))
    cells += [(f'{shift}/pfl_resfim-{s}', {'phantom.shift': shift, 'method': 'pfl_resfim',
                                           'resfim.selector': s})
              for s in selector_names if s != 'residual']
  first_seed = str(build.parse_seeds(config.seeds)[0])
  cells += [(f'placement/{s}', {'phantom.shift': shifts[0], 'method': 'pfl_resfim',
                                'resfim.selector': s, 'resfim.scope': 'global',
                                'seeds': first_seed})
            for s in (selector_names if placement is None else placement)]
  return cells


def run(config: ml_collections.ConfigDict, workdir: str, out: str,
        shifts: Sequence[str] = SHIFTS, baselines: Sequence[str] = BASELINES,
        selector_names: Sequence[str] = selectors.SELECTORS,
        placement: Optional[Sequence[str]] = None) -> str:
  """Run (or resume) every cell of :func:`grid`, then write ``out``; returns the markdown."""
  runs: Dict[str, Dict] = {}
  cells = grid(config, shifts, baselines, selector_names, placement)
  for i, (name, overrides) in enumerate(cells):
    log.warning('evidence cell %d/%d: %s', i + 1, len(cells), name)
    cell_dir = os.path.join(workdir, name)
    result = train.train_and_evaluate(sweep.with_values(config, overrides), cell_dir)
    runs[name] = {'clients': result['clients'], 'metrics': report.load_metrics(cell_dir),
                  'test': {m: [r['test_dice'] for r in res['per_seed']]
                           for m, res in result['methods'].items()}}
  text = write(config, runs, shifts, os.path.dirname(os.path.abspath(out)) or '.')
  with open(out, 'w') as f:
    f.write(text)
  print(f'written: {out}')
  return text


def _label(cell: str, method: str) -> str:
  """Row label: the method, pfl_resfim with its selector."""
  if cell.endswith('/baselines'):
    return 'pfl_resfim (residual)' if method == 'pfl_resfim' else method
  return f"pfl_resfim ({cell.rsplit('-', 1)[1]})"


def _shift_runs(runs: Dict, shift: str) -> List[Tuple[str, str, str]]:
  """``[(row label, cell, method)]`` of one shift, baselines first."""
  return [(_label(c, m), c, m) for c in runs if c.startswith(shift + '/')
          for m in runs[c]['test']]


def _mean_std(values) -> str:
  v = np.asarray(values, np.float64)
  return f'{v.mean():.1f} ± {v.std():.1f}' if v.size > 1 else f'{v.mean():.1f}'


def _curve_rows(records_by_seed: Dict[int, List[dict]], at: Sequence[int]) -> List[str]:
  """Mean val Dice (%) over clients and seeds at rounds ``at``."""
  per_seed = [[100 * np.mean(recs[r]['val']['dice']) for r in at] for recs in records_by_seed.values()]
  return [f'{v:.1f}' for v in np.mean(per_seed, 0)]


def _mask_stats(records_by_seed: Dict[int, List[dict]]) -> Tuple[str, str]:
  """(kept from the previous round, rounds 1..T-1; overlap with other clients, last round):
  mean over clients, then mean +- std over seeds, in %."""
  kept, overlap = [], []
  for recs in records_by_seed.values():
    kept.append(100 * np.mean([np.mean(r['mask_kept']) for r in recs[1:]]) if len(recs) > 1 else np.nan)
    overlap.append(100 * np.mean(recs[-1]['mask_overlap']))
  return _mean_std(kept), _mean_std(overlap)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
  return ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header),
          *['| ' + ' | '.join(r) + ' |' for r in rows]]


def _settings(config) -> List[str]:
  c = build.resolve(config)
  size = c.phantom.image_size
  b = int(np.floor(size * c.spectral.ratio))
  return [f'Phantom: {c.phantom.num_sites} sites at {size}x{size}, {c.rounds} rounds of '
          f'{c.local_epochs} local epochs (lr {c.lr}, {c.lr_schedule} schedule), UNet base '
          f'{c.model.base} with {c.model.levels} levels, seeds {c.seeds}; resfim.ratio '
          f'{c.resfim.ratio}, spectral.ratio {c.spectral.ratio} (a {2 * b + 1}x{2 * b + 1} '
          'amplitude window). Test Dice is recorded at each client\'s best val Dice of rounds '
          f'{config_lib.first_recorded_round(c)}..{c.rounds - 1} (METHOD.md 7).']


def _shift_section(runs: Dict, shift: str, out_dir: str, colours: int) -> List[str]:
  rows = _shift_runs(runs, shift)
  clients = runs[rows[0][1]]['clients']
  lines = [f'## Shift: {shift}', '', '### Test Dice (%), mean ± std over seeds', '']
  lines += _table(['method', *clients, 'mean'],
                  [[label, *train.dice_cells(runs[c]['test'][m])[0]] for label, c, m in rows])
  metrics = {label: runs[c]['metrics'][m] for label, c, m in rows}
  n = min(len(recs) for per_seed in metrics.values() for recs in per_seed.values())
  at = sorted({0, n // 4, n // 2, (3 * n) // 4, n - 1})
  lines += ['', '### Val Dice (%) over rounds, mean over clients and seeds', '']
  lines += _table(['method', *[f'round {r}' for r in at]],
                  [[label, *_curve_rows(per_seed, at)] for label, per_seed in metrics.items()])
  picture = f'evidence/{shift}_val_dice.png'
  os.makedirs(os.path.join(out_dir, 'evidence'), exist_ok=True)
  report.dice_curves(metrics, clients, os.path.join(out_dir, picture), colours)
  lines += ['', f'![val Dice per client, {shift}]({picture})', '',
            '### Masks: kept local from the previous round, and shared with the other clients', '',
            'Kept: the share of a client\'s local entries that were local in the round before '
            '(mean over rounds 1..T-1 and clients). Overlap: the share of its local entries the '
            'other clients also keep local (last round, mean over pairs). Random at ratio r '
            'gives r on both.', '']
  lines += _table(['method', 'kept (%)', 'overlap (%)'],
                  [[label, *_mask_stats(per_seed)] for label, per_seed in metrics.items()
                   if 'mask_kept' in next(iter(per_seed.values()))[-1]])
  return lines + ['']


def _placement_section(runs: Dict) -> List[str]:
  cells = [c for c in runs if c.startswith('placement/')]
  if not cells:
    return []
  last = {c.split('/', 1)[1]: next(iter(runs[c]['metrics']['pfl_resfim'].values()))[-1]
          for c in cells}
  layers = sorted(next(iter(last.values()))['layer_fraction'], key=report._layer_order)
  rows = [[layer, *[f"{100 * np.mean(rec['layer_fraction'][layer]):.1f}" for rec in last.values()]]
          for layer in layers]
  return ['## Where each selector keeps its entries local (resfim.scope = global)', '',
          'Per layer, the % of its entries kept local at the last round (mean over clients); '
          'every selector keeps the same total. First shift, first seed.', '',
          *_table(['layer', *last], rows), '']


def write(config, runs: Dict, shifts: Sequence[str], out_dir: str) -> str:
  """The markdown of :func:`run` (pictures written under ``out_dir/evidence/``)."""
  head = ['# Evidence: does ResFIM find the domain-sensitive parameters?', '',
          'Written by `python experiments/evidence.py` (pflresfim_jax/evidence.py); rerun it '
          'rather than editing this file.', '', *_settings(config), '']
  summary = [[label, *[train.dice_cells(runs[c]['test'][m])[0][-1] for _, c, m in
                       [next(r for r in _shift_runs(runs, s) if r[0] == label) for s in shifts]]]
             for label, _, _ in _shift_runs(runs, shifts[0])]
  head += ['## Mean test Dice (%) by shift', '', *_table(['method', *shifts], summary), '']
  colours = report.colours_of(config)
  body = [line for s in shifts for line in _shift_section(runs, s, out_dir, colours)]
  return '\n'.join(head + body + _placement_section(runs)) + '\n'
