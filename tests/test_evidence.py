"""experiments/evidence.py's grid on a tiny phantom: every cell runs, the page reports them,
and a second call trains nothing."""
import os

from pflresfim_jax import evidence, selectors
from fed_helpers import tiny_config


def test_grid_covers_shifts_baselines_and_every_selector():
  cells = dict(evidence.grid(tiny_config(seeds='3,4')))
  assert list(cells)[:5] == ['style/baselines', 'style/pfl_resfim-fisher', 'style/pfl_resfim-inverse',
                             'style/pfl_resfim-random', 'style/pfl_resfim-fedcac']
  assert cells['mixed/baselines'] == {'phantom.shift': 'mixed', 'method': ','.join(evidence.BASELINES)}
  assert cells['mixed/pfl_resfim-random']['resfim.selector'] == 'random'
  placement = [c for c in cells if c.startswith('placement/')]
  assert [c.split('/')[1] for c in placement] == list(selectors.SELECTORS)
  assert all(cells[c]['resfim.scope'] == 'global' and cells[c]['seeds'] == '3' and
             cells[c]['phantom.shift'] == 'style' for c in placement)
  assert len(cells) == 2 * 5 + 5
  small = evidence.grid(tiny_config(), ('style',), ('fedavg',), ('residual',), placement=('random',))
  assert [c for c, _ in small] == ['style/baselines', 'placement/random']


def _rows(md, header):
  """The markdown table after ``header``: {first cell: [other cells]}."""
  block = next(b for b in md.split(header, 1)[1].split('\n\n') if b.startswith('|'))
  rows = [[c.strip() for c in line.strip('|').split('|')] for line in block.splitlines()[2:]]
  return {r[0]: r[1:] for r in rows}


def test_evidence_runs_and_reports(tmp_path):
  cfg = tiny_config(rounds=2, seeds='0,1', **{'phantom.num_sites': 2, 'report.enabled': False})
  out = tmp_path / 'docs' / 'evidence.md'
  out.parent.mkdir()
  # Placement of 'random' only: a global-scope Fisher program would be one more compile.
  kw = dict(shifts=('style',), baselines=('fedavg', 'pfl_resfim'),
            selector_names=('residual', 'random'), placement=('random',))
  md = evidence.run(cfg, str(tmp_path / 'runs'), str(out), **kw)
  assert out.read_text() == md
  assert (tmp_path / 'docs' / 'evidence' / 'style_val_dice.png').stat().st_size > 0
  # The test table quotes each cell's own results.csv (mean +- std over both seeds).
  table = _rows(md, '### Test Dice (%), mean ± std over seeds')
  assert set(table) == {'fedavg', 'pfl_resfim (residual)', 'pfl_resfim (random)'}
  csv = (tmp_path / 'runs' / 'style' / 'baselines' / 'results.csv').read_text().splitlines()
  fedavg = next(line for line in csv if line.startswith('fedavg,')).split(',')[1:]
  assert [c.replace(' ', '') for c in table['fedavg']] == fedavg
  summary = _rows(md, '## Mean test Dice (%) by shift')
  assert summary['pfl_resfim (random)'] == [table['pfl_resfim (random)'][-1]]
  # Masks: kept and overlap are shares in %; FedAvg keeps nothing local, so has no row.
  masks_rows = _rows(md, '### Masks: kept local from the previous round')
  assert set(masks_rows) == {'pfl_resfim (residual)', 'pfl_resfim (random)'}
  for kept, overlap in masks_rows.values():
    for v in (kept, overlap):
      mean = float(v.split('±')[0])
      assert 0.0 <= mean <= 100.0
  # A random 20% of ~2,000 entries: about 20% of it was local before, and at the other client.
  kept_random = float(masks_rows['pfl_resfim (random)'][0].split('±')[0])
  assert 12.0 < kept_random < 28.0
  # Placement: the selector's share per layer in global scope.
  place = _rows(md, '## Where each selector keeps its entries local')
  assert list(next(iter(place.values()))) and {'head', 'enc1_0/conv'} <= set(place)
  assert all(len(v) == 1 and 0.0 <= float(v[0]) <= 100.0 for v in place.values())
  assert 'spectral.ratio 0.1 (a 3x3 amplitude window)' in md   # 16x16: b = floor(1.6) = 1
  # Resumable: a second call finds every run finished and trains nothing.
  stamps = {p: os.path.getmtime(p) for p in (tmp_path / 'runs').rglob('metrics.jsonl')}
  assert len(stamps) == 2 * 2 + 2 + 1   # baselines and random x 2 seeds; placement x 1
  again = evidence.run(cfg, str(tmp_path / 'runs'), str(out), **kw)
  assert again == md
  assert {p: os.path.getmtime(p) for p in stamps} == stamps
