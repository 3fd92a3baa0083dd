import os
import subprocess
import sys

import pytest

from pflresfim_jax import build, config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One bad value per rule (a table over the whole config): each must be refused by
# build.resolve, before anything is loaded or traced, naming its full field.
BAD = [
    ('rounds', 0), ('paper_rounds', -1), ('local_epochs', -1), ('batch_size', 0), ('lr', 0.0), ('paper_lr', -1e-3), ('phantom.lr', 0.0),
    ('lr_schedule', 'cosine'), ('weight_decay', -1e-4), ('data.name', 'retina'),
    ('data.image_size', (250, 256)), ('data.split_seed', -1), ('phantom.image_size', 40),
    ('phantom.rounds', 0), ('phantom.model_base', 0), ('phantom.num_sites', 0), ('phantom.seed', -2), ('phantom.shift', 'both'),
    ('model.name', 'resnet'), ('model.base', 0), ('model.paper_base', 0), ('model.levels', 6),
    ('model.bias_init', 'kaiming'), ('model.bn_unbiased', 'maybe'), ('model.conv', 'fft'),
    ('aggregate_weights', 'sizes'),
    ('augment.flip', 'maybe'), ('augment.rot90', 2), ('spectral.ratio', 0.5),
    ('spectral.lam_min', -0.1), ('spectral.lam_max', 1.5), ('spectral.share', 'all'),
    ('fisher.loss', 'hinge'), ('fisher.num_examples', 0), ('fisher.chunk_size', 0), ('fisher.conv', 'fft'),
    ('fisher.grads', 'loop'),
    ('resfim.ratio', 1.5), ('resfim.scope', 'layer'), ('resfim.residual', 'squared'),
    ('resfim.eps', 0.0), ('resfim.every', 0), ('resfim.warmup_rounds', -1), ('fedprox.mu', -1.0), ('moon.mu', -0.1), ('feddyn.mu', 0.0), ('fedawa.lr', 0.0), ('fedlws.beta', -1.0), ('fedlws.min_tau', -0.1), ('fedlws.max_tau', -0.1), ('moon.temperature', 0.0),
    ('resfim.selector', 'magic'),
    ('ditto.mu', -1.0), ('ditto.lr', 0.0), ('fedrep.head_epochs', -1), ('fedcac.tau', 2.0),
    ('fedcac.beta', 0.0), ('engine.client_axis', 'pmap'), ('engine.unroll', 'sometimes'),
    ('engine.precision', 'fp8'), ('engine.devices', '0'), ('engine.cpu_devices', 0), ('cluster.num_processes', -1),
    ('cluster.process_id', -2), ('checkpoint.every', 0), ('checkpoint.keep', 0), ('checkpoint.stop_grace', -1.0),
    ('report.examples', -1), ('report.colours', 257), ('report.enabled', 'yes'), ('tensorboard', 'maybe'),
    ('eval.batch_size', 0), ('eval.threshold', 1.0), ('eval.record_from', 'best'),
    ('resume', 'no'), ('compile_cache', 3),
    ('distributed', 'no'),
]


def with_value(path, value):
  c = config_lib.base_config()
  node = c
  *parents, last = path.split('.')
  for key in parents:
    node = node[key]
  with c.ignore_type():
    node[last] = value
  return c


@pytest.mark.parametrize('path,value', BAD, ids=[p for p, _ in BAD])
def test_bad_value_names_its_full_field(path, value):
  with pytest.raises(ValueError, match=rf'config\.{path} '):
    build.resolve(with_value(path, value))


def test_every_field_has_a_rule():
  c = config_lib.base_config()
  leaves = []

  def walk(node, prefix):
    for key, value in node.items():
      path = prefix + key
      if hasattr(value, 'items'):
        walk(value, path + '.')
      else:
        leaves.append(path)
  walk(c, '')
  missing = set(leaves) - set(config_lib.RULES) - set(config_lib.PARSED_ELSEWHERE)
  assert not missing, f'fields without a rule: {sorted(missing)}'
  assert {p for p, _ in BAD} == set(config_lib.RULES), 'one bad value per rule'


def test_shipped_configs_and_edges_pass():
  for name in ('vessel', 'prostate', 'gland', 'evidence'):
    scope = {}
    exec(open(os.path.join(ROOT, 'configs', f'{name}.py')).read(), scope)
    build.resolve(scope['get_config']())
  for path, value in [('local_epochs', 0), ('resfim.ratio', 0.0), ('fisher.chunk_size', None),
                      ('engine.unroll', 'false'), ('engine.devices', '2'), ('spectral.ratio', 0.0)]:
    build.resolve(with_value(path, value))
  c = with_value('spectral.lam_max', 0.1)
  c.spectral.lam_min = 0.5
  with pytest.raises(ValueError, match=r'config\.spectral\.lam_min \(0.5\) must be <= config\.spectral\.lam_max'):
    build.resolve(c)
  # The recording window: rounds T//2.. (METHOD.md 7) or T//2 + 1.. (main_seg.py); a
  # window past the last round is refused, also when build.resolve fills the rounds.
  for rounds, record_from, first in ((16, 'half', 8), (16, 'after_half', 9), (3, 'after_half', 2),
                                     (1, 'half', 0)):
    c = with_value('eval.record_from', record_from)
    c.rounds = rounds
    assert config_lib.first_recorded_round(build.resolve(c)) == first
  for rounds in (1, None):
    c = with_value('eval.record_from', 'after_half')
    c.rounds, c.phantom.rounds = rounds, 1
    with pytest.raises(ValueError, match=r"config\.eval\.record_from='after_half' records from round 1, "
                                         r"past the last of config\.rounds=1"):
      build.resolve(c)


def test_entry_point_refuses_before_loading(tmp_path):
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'experiments', 'main.py'),
                        f'--config={ROOT}/configs/vessel.py', f'--workdir={tmp_path / "w"}',
                        '--config.batch_size=0'], capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1] == 'error: config.batch_size must be an integer >= 1, got 0'
  assert not (tmp_path / 'w').exists()   # nothing written
