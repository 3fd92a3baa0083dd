"""Grids of runs: ``run(config, grid, workdir)`` -> one combined table.

A grid is ``'field=v1,v2;other.field=w1,w2'`` (every combination is a cell); methods
and seeds stay ordinary config fields, so ``--config.method=all --config.seeds=0,1,2``
runs every method and seed in every cell. Each cell is a normal workdir
``<workdir>/<field>=<v>,<other.field>=<w>`` run by ``train.train_and_evaluate``:
finished runs inside it are skipped and interrupted ones resume, so re-running a
sweep only does what is missing. The combined table ``sweep.md`` / ``sweep.csv``
has a row per cell and method: the cell's values, then test Dice per client and
the mean (mean +- std over seeds).
"""
from __future__ import annotations

import ast
import itertools
import logging
import os
from typing import Any, Dict, List, Sequence, Tuple

import ml_collections
import numpy as np

from pflresfim_jax import train

log = logging.getLogger('pflresfim_jax')


def _value(text: str, like: Any) -> Any:
  """Parse ``text`` to the type of the field's current value ``like``."""
  if isinstance(like, bool):
    if text.lower() not in ('true', 'false'):
      raise ValueError(f'expected true or false, got {text!r}')
    return text.lower() == 'true'
  if isinstance(like, int):
    return int(text)
  if isinstance(like, float):
    return float(text)
  if isinstance(like, str):
    return text
  try:  # a placeholder (None) or another type: a Python literal, else the text
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _field_value(config: ml_collections.ConfigDict, field: str, who: str) -> Any:
  """The current value of dotted ``field`` (its type types the new values)."""
  node = config
  *path, last = field.split('.')
  try:
    for p in path:
      node = node[p]
    return node[last]
  except (KeyError, AttributeError):
    raise ValueError(f'{who}: config has no field {field!r}') from None


def override(config: ml_collections.ConfigDict, spec: str, who: str = 'override'
             ) -> ml_collections.ConfigDict:
  """A copy of ``config`` with ``'field=value;other.field=value'`` applied, each value
  typed like its field (commas stay inside a value: ``method=fedavg,local``).

  Raises ValueError naming the field when it does not exist or a value does not parse.
  """
  cell = {}
  for part in [p.strip() for p in spec.split(';') if p.strip()]:
    if '=' not in part:
      raise ValueError(f'{who}: {part!r} is not field=value')
    field, value = (s.strip() for s in part.split('=', 1))
    like = _field_value(config, field, who)
    try:
      cell[field] = _value(value, like)
    except (ValueError, SyntaxError) as e:
      raise ValueError(f'{who}: field {field}: {e}') from None
  return with_values(config, cell)


# Fields read once at start-up (cli.prepare), before any cell runs.
ONCE_PER_PROCESS = ('engine.cpu_devices', 'distributed', 'compile_cache')


def parse_grid(spec: str, config: ml_collections.ConfigDict) -> List[Tuple[str, List[Any]]]:
  """``'a.b=1,2;c=x,y'`` -> ``[('a.b', [1, 2]), ('c', ['x', 'y'])]`` typed like the config.

  Raises ValueError naming the field when it does not exist or a value does not parse.
  """
  axes = []
  for part in [p.strip() for p in spec.split(';') if p.strip()]:
    if '=' not in part:
      raise ValueError(f'sweep: {part!r} is not field=value1,value2,...')
    field, values = (s.strip() for s in part.split('=', 1))
    like = _field_value(config, field, 'sweep')
    if field in ('method', 'seeds'):
      raise ValueError(f'sweep: set {field} with --config.{field}; it applies to every cell')
    if field in ONCE_PER_PROCESS:
      raise ValueError(f'sweep: {field} is applied once, when the process starts; set it '
                       f'with --config.{field} for the whole sweep')
    try:
      parsed = [_value(v.strip(), like) for v in values.split(',') if v.strip()]
    except (ValueError, SyntaxError) as e:
      raise ValueError(f'sweep: field {field}: {e}') from None
    if not parsed:
      raise ValueError(f'sweep: field {field} has no values')
    axes.append((field, parsed))
  if not axes:
    raise ValueError('sweep: the grid is empty; e.g. --sweep="resfim.ratio=0.1,0.2"')
  return axes


def cells(axes: Sequence[Tuple[str, List[Any]]]) -> List[Dict[str, Any]]:
  """Every combination: ``[{'a.b': 1, 'c': 'x'}, ...]`` (last field varies fastest)."""
  names = [a for a, _ in axes]
  return [dict(zip(names, combo)) for combo in itertools.product(*[v for _, v in axes])]


def cell_name(cell: Dict[str, Any]) -> str:
  return ','.join(f'{k}={v}' for k, v in cell.items()).replace(os.sep, '_')


def with_values(config: ml_collections.ConfigDict, cell: Dict[str, Any]) -> ml_collections.ConfigDict:
  out = ml_collections.ConfigDict(config.to_dict())
  for field, v in cell.items():
    node = out
    *path, last = field.split('.')
    for p in path:
      node = node[p]
    node[last] = v
  return out


def run(config: ml_collections.ConfigDict, spec: str, workdir: str) -> Dict[str, str]:
  """Run every cell of grid ``spec``; write and return the combined table {'md', 'csv'}."""
  axes = parse_grid(spec, config)
  grid = cells(axes)
  names = [a for a, _ in axes]
  rows: List[Tuple[Dict[str, Any], str, List[np.ndarray]]] = []
  clients: List[str] = []
  for i, cell in enumerate(grid):
    log.warning('sweep cell %d/%d: %s', i + 1, len(grid), cell_name(cell))
    out = train.train_and_evaluate(with_values(config, cell), os.path.join(workdir, cell_name(cell)))
    clients = out['clients']
    for method, res in out['methods'].items():
      rows.append((cell, method, [r['test_dice'] for r in res['per_seed']]))
  header = [*names, 'method', *clients, 'mean']
  md = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  csv = [','.join(header)]
  for cell, method, per_seed in rows:
    md_cells, csv_cells = train.dice_cells(per_seed)
    values = [str(cell[n]) for n in names]
    md.append('| ' + ' | '.join([*values, method, *md_cells]) + ' |')
    csv.append(','.join([*values, method, *csv_cells]))
  tables = {'md': '\n'.join(md) + '\n', 'csv': '\n'.join(csv) + '\n'}
  for ext in ('md', 'csv'):
    with open(os.path.join(workdir, f'sweep.{ext}'), 'w') as f:
      f.write(tables[ext])
  print(tables['md'])
  print(f'written: {os.path.join(workdir, "sweep.md")}, sweep.csv, one workdir per cell')
  return tables
