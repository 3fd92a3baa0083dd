"""build: the resolved config and what a run is made of."""
import os

import pytest

from pflresfim_jax import build, config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_methods_and_seeds():
  assert build.parse_methods('all') == list(config_lib.METHODS)
  assert build.parse_methods('fedavg, fedbn') == ['fedavg', 'fedbn']
  with pytest.raises(ValueError, match='fedfoo'):
    build.parse_methods('fedavg,fedfoo')
  assert build.parse_seeds('0,1,2') == [0, 1, 2] and build.parse_seeds(3) == [3]
  with pytest.raises(ValueError, match='config.seeds'):
    build.parse_seeds('a,b')
  spec = os.path.join(ROOT, 'examples', 'update_mask.py') + ':UpdateMask'
  assert build.parse_methods(f'fedavg,{spec}') == ['fedavg', spec]   # loaded, not only split
  with pytest.raises(ValueError, match='config.method'):
    build.parse_methods('fedavg,examples/none.py:X')


def test_method_folder_is_one_safe_name():
  assert build.method_folder('pfl_resfim') == 'pfl_resfim'
  assert build.method_folder('/a/b/my.py:Cls') == '_a_b_my.py_Cls'


def test_resolve_picks_phantom_or_paper_defaults():
  c = config_lib.base_config()
  r = build.resolve(c)
  assert r.rounds == c.phantom.rounds and r.model.base == c.phantom.model_base
  assert r.lr == c.phantom.lr
  c.data.root = '/somewhere'
  r = build.resolve(c)
  assert r.rounds == c.paper_rounds and r.model.base == 16 and r.lr == c.paper_lr
  c.rounds, c.lr = 7, 5e-4
  assert build.resolve(c).rounds == 7 and build.resolve(c).lr == 5e-4
  c.data.root = None
  assert build.resolve(c).lr == 5e-4      # an explicit lr wins on the phantom too
  c.engine.precision = 'fp8'
  with pytest.raises(ValueError, match='engine.precision'):
    build.resolve(c)
