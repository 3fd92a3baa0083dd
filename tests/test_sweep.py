import csv
import os

import pytest

from pflresfim_jax import config as config_lib, sweep


def test_parse_grid_types_and_errors():
  c = config_lib.base_config()
  axes = sweep.parse_grid('resfim.ratio=0.1,0.3; local_epochs=1,2 ;augment.flip=false;'
                          'resfim.scope=tensor,global;rounds=5', c)
  assert axes == [('resfim.ratio', [0.1, 0.3]), ('local_epochs', [1, 2]), ('augment.flip', [False]),
                  ('resfim.scope', ['tensor', 'global']), ('rounds', [5])]
  assert len(sweep.cells(axes)) == 8
  assert sweep.cells(axes)[1] == {'resfim.ratio': 0.1, 'local_epochs': 1, 'augment.flip': False,
                                  'resfim.scope': 'global', 'rounds': 5}
  with pytest.raises(ValueError, match="no field 'resfim.ratoi'"):
    sweep.parse_grid('resfim.ratoi=0.1', c)
  with pytest.raises(ValueError, match='local_epochs'):
    sweep.parse_grid('local_epochs=two', c)
  with pytest.raises(ValueError, match='--config.method'):
    sweep.parse_grid('method=fedavg,local', c)
  with pytest.raises(ValueError, match='once, when the process starts.*--config.engine.cpu_devices'):
    sweep.parse_grid('engine.cpu_devices=1,2', c)
  with pytest.raises(ValueError, match='grid is empty'):
    sweep.parse_grid(' ; ', c)
  assert sweep.with_values(c, {'resfim.ratio': 0.3}).resfim.ratio == 0.3 and c.resfim.ratio == 0.2


def test_sweep_runs_cells_skips_finished_and_combines(tmp_path, caplog):
  from fed_helpers import tiny_config
  # The phantom's seed changes the data, not the compiled program: one compile for the grid.
  cfg = tiny_config(method='local', rounds=1, **{'report.enabled': False})
  tables = sweep.run(cfg, 'phantom.seed=0,1', str(tmp_path))
  rows = list(csv.reader(tables['csv'].splitlines()))
  assert rows[0] == ['phantom.seed', 'method', 'PhantomA', 'PhantomB', 'PhantomC', 'mean']
  assert [r[:2] for r in rows[1:]] == [['0', 'local'], ['1', 'local']]
  assert (tmp_path / 'sweep.csv').read_text() == tables['csv']
  for cell, row in (('phantom.seed=0', rows[1]), ('phantom.seed=1', rows[2])):
    assert (tmp_path / cell / 'results.csv').read_text().splitlines()[1] == ','.join(row[1:])
  assert rows[1][2:] != rows[2][2:]       # other data, other result
  stamp = os.path.getmtime(tmp_path / 'phantom.seed=1' / 'local' / 'seed0' / 'result.json')
  caplog.clear()
  assert sweep.run(cfg, 'phantom.seed=0,1', str(tmp_path)) == tables
  assert sum('finished earlier' in r.getMessage() for r in caplog.records) == 2
  assert os.path.getmtime(tmp_path / 'phantom.seed=1' / 'local' / 'seed0' / 'result.json') == stamp


def test_override_types_values_keeps_commas_and_names_bad_fields():
  c = config_lib.base_config()
  out = sweep.override(c, 'rounds=3; method=fedavg,local ;resfim.ratio=0.1;model.base=4')
  assert out.rounds == 3 and out.method == 'fedavg,local' and out.resfim.ratio == 0.1
  assert out.model.base == 4 and c.method != 'fedavg,local'      # a copy
  with pytest.raises(ValueError, match="--set: config has no field 'no.such'"):
    sweep.override(c, 'no.such=1', '--set')
  with pytest.raises(ValueError, match='override: field local_epochs'):
    sweep.override(c, 'local_epochs=many')
  with pytest.raises(ValueError, match="'rounds' is not field=value"):
    sweep.override(c, 'rounds')
