"""The client axis over several devices, checked on 8 fake CPU devices."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from pflresfim_jax.clients import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_padding_and_mesh_helpers():
  mesh = sharding.client_mesh(1)
  assert mesh.size == 1 and mesh.axis_names == ('clients',)
  assert sharding.padded_clients(3, mesh) == 3
  fake8 = jax.devices() * 8          # only sizes matter for padded_clients
  assert sharding.padded_clients(3, sharding.client_mesh('auto', fake8[:1])) == 3
  padded = sharding.pad_clients({'x': np.ones((3, 2)), 'n': np.array([4, 5, 6])}, 8)
  assert padded['x'].shape == (8, 2) and padded['x'][3:].sum() == 0
  assert padded['n'].tolist() == [4, 5, 6, 0, 0, 0, 0, 0]
  with pytest.raises(ValueError, match='engine.devices=4'):
    sharding.client_mesh(4, jax.devices()[:1])
  with pytest.raises(ValueError, match='engine.devices'):
    sharding.client_mesh('many')


SPLIT = r'''
import json, logging, sys
import jax
from pflresfim_jax.clients import sharding
logging.basicConfig()
first = sharding.split_host_cpu(int(sys.argv[1]))
jax.numpy.zeros(1).block_until_ready()       # the backends run from here on
again = sharding.split_host_cpu(1)             # too late: kept, with a warning
print(json.dumps([first, again, len(jax.devices('cpu'))]))
'''


@pytest.mark.parametrize('xla_flags, want', [('', [3, 3, 3]),
                                             ('--xla_force_host_platform_device_count=5', [5, 5, 5])])
def test_split_host_cpu_applies_before_jax_starts_and_the_environment_wins(xla_flags, want):
  env = {**os.environ, 'XLA_FLAGS': xla_flags, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT}
  env.pop('JAX_NUM_CPU_DEVICES', None)
  proc = subprocess.run([sys.executable, '-c', SPLIT, '3'], capture_output=True, text=True,
                        env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == want
  assert 'engine.cpu_devices=1, but the host CPU is' in proc.stderr
  assert ('set by the environment' in proc.stderr) == bool(xla_flags)


SCRIPT = r'''
import json, sys
import jax, numpy as np
from pflresfim_jax import build, train
from pflresfim_jax.clients import sharding
sys.path.insert(0, sys.argv[2])
from fed_helpers import tiny_config, tiny_fed
assert len(jax.devices()) == 8, jax.devices()
from pflresfim_jax import masks
import re
stacked = sharding.put_clients({'a': np.arange(8 * 15).reshape(8, 3, 5) % 3 == 0,
                                'b': np.arange(8 * 7).reshape(8, 7) % 2 == 0}, sharding.client_mesh(8))
gathers = re.findall(r'= (\w+)\[[^=]*? all-gather\(', jax.jit(masks.overlap).lower(stacked).compile().as_text())
out = {'overlap_all_gathers': gathers}
for method, axis, devices in [('pfl_resfim', 'vmap', 1), ('pfl_resfim', 'vmap', 8),
                              ('fedavg', 'map', 1), ('fedavg', 'map', 2)]:
  cfg = tiny_config(method=method, rounds=2, lr=1e-6, **{'engine.client_axis': axis})
  fed = tiny_fed(16, 3)
  mesh = sharding.client_mesh(devices)
  base = f'{sys.argv[1]}/{method}-{axis}-{devices}'
  workdir = f'{base}/{method}/seed0'
  res = train.run_one(cfg, fed, method, 0, workdir, mesh=mesh)
  lines = [json.loads(l) for l in open(workdir + '/metrics.jsonl')]
  from pflresfim_jax import checkpoint
  ck = checkpoint.Checkpointer(workdir + '/checkpoints', 1, 1)
  init_fn, _ = build.compile_method(cfg, fed, method, mesh)
  one = sharding.replicated(sharding.client_mesh(1))
  saved, _, _ = ck.restore({'fed': sharding.abstract(jax.eval_shape(init_fn, jax.random.PRNGKey(0)), one),
                            'key': sharding.abstract(jax.random.PRNGKey(0), one)},
                           sharding.abstract(build.spectral_bank(fed, cfg), one))
  ck.close()
  params = np.concatenate([np.asarray(x)[:3].ravel() for x in jax.tree.leaves(saved['fed']['params'])])
  np.save(f'{workdir}/params.npy', params)
  np.save(f'{workdir}/mask.npy', np.concatenate([np.asarray(x)[:3].ravel() for x in jax.tree.leaves(saved['fed']['local_mask'])]))
  if devices == 8:   # the report restores the padded, 8-way sharded checkpoint on one device
    from pflresfim_jax import report
    assert report.predictions(base, cfg, fed, method, 0, base + '/pred.png', 1)
    import os
    os.rename(workdir + '/result.json', workdir + '/result.json.bak')
    try:               # resuming on 1 device (3 slots instead of 8) is refused clearly
      train.run_one(cfg, fed, method, 0, workdir, mesh=sharding.client_mesh(1))
      raise SystemExit('resume on another slot count was not refused')
    except ValueError as e:
      assert 'holds 8 client slots' in str(e) and 'pad them to 3' in str(e), e
    os.rename(workdir + '/result.json.bak', workdir + '/result.json')
  out[f'{method}-{axis}-{devices}'] = {'test_dice': res['test_dice'].tolist(), 'rounds': lines,
                                       'params': f'{workdir}/params.npy'}
json.dump(out, open(sys.argv[1] + '/out.json', 'w'))
'''


def test_sharded_clients_match_one_device(tmp_path):
  """K=3 clients over 8 devices (padded to 8) and 'map' over 2 devices (padded to 4)
  give the single-device results."""
  env = {**os.environ, 'XLA_FLAGS': os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8',
         'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT}
  proc = subprocess.run([sys.executable, '-c', SCRIPT, str(tmp_path), os.path.dirname(__file__)],
                        capture_output=True, text=True, env=env, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads((tmp_path / 'out.json').read_text())
  # masks.overlap with the clients sharded: the masks cross devices once, as int8.
  assert out.pop('overlap_all_gathers') == ['s8'], out
  # Per-device programs batch the convolutions differently, so floats differ in the last
  # bits. Adam turns that noise in near-zero gradients into +-lr steps, so (as in
  # test_engine's vmap-vs-map check) the runs use a tiny lr. A real difference (a
  # padded client counted, another RNG stream) moves everything far more.
  for method, axis, d in (('pfl_resfim', 'vmap', 8), ('fedavg', 'map', 2)):
    one, many = out[f'{method}-{axis}-1'], out[f'{method}-{axis}-{d}']
    assert len(many['test_dice']) == 3          # padded clients never reach the results
    assert d != 8 or (tmp_path / f'{method}-{axis}-{d}' / 'pred.png').stat().st_size > 0
    np.testing.assert_allclose(np.load(many['params']), np.load(one['params']), atol=1e-5)
    mask_1, mask_d = (np.load(r['params'].replace('params.npy', 'mask.npy')) for r in (one, many))
    assert np.mean(mask_1 == mask_d) > 0.99
    np.testing.assert_allclose(many['test_dice'], one['test_dice'], atol=1e-2)   # in %
    for r1, rd in zip(one['rounds'], many['rounds']):
      np.testing.assert_allclose(rd['train_loss'], r1['train_loss'], rtol=1e-4)
      np.testing.assert_allclose(rd['val']['dice'], r1['val']['dice'], atol=1e-4)
      np.testing.assert_allclose(rd['local_fraction'], r1['local_fraction'], atol=1e-6)
