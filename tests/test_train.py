import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pflresfim_jax import config as config_lib, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_methods_and_seeds():
  assert train.parse_methods('all') == list(config_lib.METHODS)
  assert train.parse_methods('fedavg, fedbn') == ['fedavg', 'fedbn']
  with pytest.raises(ValueError, match='fedfoo'):
    train.parse_methods('fedavg,fedfoo')
  assert train.parse_seeds('0,1,2') == [0, 1, 2] and train.parse_seeds(3) == [3]
  with pytest.raises(ValueError, match='config.seeds'):
    train.parse_seeds('a,b')


def test_resolve_picks_phantom_or_paper_defaults():
  c = config_lib.base_config()
  r = train.resolve(c)
  assert r.rounds == c.phantom.rounds and r.model.base == c.phantom.model_base
  c.data.root = '/somewhere'
  r = train.resolve(c)
  assert r.rounds == c.paper_rounds and r.model.base == 16
  c.rounds = 7
  assert train.resolve(c).rounds == 7
  c.engine.precision = 'fp8'
  with pytest.raises(ValueError, match='engine.precision'):
    train.resolve(c)


def test_default_workdir():
  c = config_lib.base_config()
  assert train.default_workdir(c) == os.path.join('runs', 'phantom-pfl_resfim')
  c.method, c.data.root = 'fedavg,local', '/data'
  assert train.default_workdir(c) == os.path.join('runs', 'vessel-fedavg+local')


def test_results_table_layout():
  t = train.results_table(['A', 'B'], {'fedavg': [np.array([70.0, 80.0]), np.array([72.0, 78.0])],
                                       'local': [np.array([60.0, 65.0]), np.array([60.0, 65.0])]})
  lines = t['md'].splitlines()
  assert lines[0] == '| method | A | B | mean |'
  assert lines[2] == '| fedavg | 71.00 ± 1.00 | 79.00 ± 1.00 | 75.00 ± 0.00 |'
  rows = list(csv.reader(t['csv'].splitlines()))
  assert rows[0] == ['method', 'A', 'B', 'mean'] and rows[2] == ['local', '60.00±0.00', '65.00±0.00', '62.50±0.00']


def test_configs_load():
  import importlib.util
  for name in ('vessel', 'prostate', 'gland'):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', f'{name}.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    assert c.data.name == name and c.method == 'pfl_resfim'
  assert mod.get_config().data.image_size == (192, 384) and not mod.get_config().augment.rot90


def test_main_end_to_end(tmp_path):
  """The shipped entry point on a tiny phantom: two methods, two seeds."""
  # No --workdir: the default runs/<data>-<method> under the current folder.
  workdir = tmp_path / 'runs' / 'phantom-local+fedavg'
  cmd = [sys.executable, os.path.join(ROOT, 'experiments', 'main.py'),
         f'--config={os.path.join(ROOT, "configs", "vessel.py")}',
         '--config.method=local,fedavg', '--config.seeds=0,1', '--config.rounds=2',
         '--config.local_epochs=1', '--config.model.base=2', '--config.phantom.image_size=16',
         '--config.phantom.num_sites=2', '--config.eval.batch_size=4']
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'built-in phantom' in proc.stderr
  assert '| method | PhantomA | PhantomB | mean |' in proc.stdout
  md = (workdir / 'results.md').read_text().splitlines()
  assert md[2].startswith('| local |') and md[3].startswith('| fedavg |') and '±' in md[3]
  lines = (workdir / 'fedavg' / 'seed1' / 'metrics.jsonl').read_text().splitlines()
  assert len(lines) == 2
  rec = json.loads(lines[-1])
  assert rec['round'] == 1 and len(rec['val']['dice']) == 2 and 0 <= rec['val']['dice'][0] <= 1
  assert json.loads((workdir / 'config.json').read_text())['rounds'] == 2


def test_main_reports_bad_config(tmp_path):
  cmd = [sys.executable, os.path.join(ROOT, 'experiments', 'main.py'),
         f'--config={os.path.join(ROOT, "configs", "vessel.py")}', f'--workdir={tmp_path}',
         '--config.method=fedfoo']
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and 'config.method' in proc.stderr and 'fedfoo' in proc.stderr
