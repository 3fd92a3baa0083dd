import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from pflresfim_jax import losses, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TORCH = importlib.util.find_spec('torch') is not None


def _bench(tmp_path, *args, env=None):
  out = tmp_path / 'bench'
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'experiments', 'benchmark.py'),
                         f'--out={out}', *args], capture_output=True, text=True, timeout=900,
                        env={**{k: v for k, v in os.environ.items() if k != 'JAX_NUM_CPU_DEVICES'},
                             'JAX_PLATFORMS': 'cpu', **(env or {})})
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads((tmp_path / 'bench.json').read_text()), (tmp_path / 'bench.md').read_text()


def test_benchmark_quick_smoke(tmp_path):
  """The benchmark runs in quick mode and writes its table (no timing is asserted); the
  PyTorch anchor's rows where torch is installed."""
  # Train-step rows for 'map' alone (--step_axis; each strategy's step is two more
  # compiles): the round rows run both strategies.
  result, md = _bench(tmp_path, '--quick', '--method=fedavg', '--client_axis=vmap,map',
                      '--step_axis=map', '--step_devices=1,2', '--anchor=torch',
                      f'--trace={tmp_path / "trace"}')
  rows = result['rows']
  anchor = 2 + 2 + 4 if HAS_TORCH else 0   # two anchor rows, two step and four Fisher ratios
  # Step rows on 1 and 2 devices; Fisher: vmap(grad) and layers at chunks 2 and 4, the loop.
  assert len(rows) == 4 + 5 + 2 * (2 + 3) + anchor and all(r['value'] > 0 for r in rows)
  assert '| per-example Fisher, layers chunk 4, conv=canonical (4 examples) |' in md
  assert 'client_axis=vmap, fp32, conv' not in md
  if HAS_TORCH:
    assert '| PyTorch anchor: train step, loop over clients, Adam, fp32 |' in md
    assert '| ours / PyTorch: train step, client_axis=map, fp32, conv=canonical |' in md
    assert 'anchor on cpu' in result['info']['anchor'] and 'threads' in result['info']['anchor']
  assert '| train step, client_axis=map, bf16, conv=canonical |' in md
  assert '| train step, client_axis=map, fp32, conv=canonical, 2 devices |' in md
  # --devices 'all' over --cpu_devices 2 (the trainer's engine.cpu_devices default).
  assert result['info']['cpu_devices'] == 2
  for axis in ('vmap', 'map'):
    assert f'full round, fedavg, fp32, 2 device(s), client_axis={axis}' in md
    for part in ('temp', 'arguments', 'outputs'):
      assert f'round memory per device (XLA analysis), {part}, fp32, 2 device(s), client_axis={axis}' in md
    # XLA:CPU's 'peak' figure leaves out the temporaries: not reported on a CPU.
    assert f'peak, fp32, 2 device(s), client_axis={axis}' not in md
  assert 'peak device memory: n/a on this backend' in md
  # --trace: one traced round per full-round row, which trace_summary reads.
  traces = sorted((tmp_path / 'trace').glob('*/plugins/profile/*/perfetto_trace.json.gz'))
  assert [t.parents[3].name for t in traces] == ['fedavg-fp32-2dev-map', 'fedavg-fp32-2dev-vmap']
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'experiments', 'trace_summary.py'),
                         str(traces[0])], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and '| convolution |' in proc.stdout, proc.stderr[-2000:]


def test_without_torch_the_anchor_is_skipped_with_the_reason(tmp_path):
  fake = tmp_path / 'fake'           # a torch that cannot be imported, wherever torch is
  (fake / 'torch').mkdir(parents=True)
  (fake / 'torch' / '__init__.py').write_text("raise ImportError('no torch here')\n")
  path = os.pathsep.join([str(fake), os.environ.get('PYTHONPATH', '')])
  result, md = _bench(tmp_path, '--quick', '--parts=none', '--anchor=torch',
                      env={'PYTHONPATH': path})
  assert result['rows'] == [] and 'PyTorch anchor skipped: no torch here' in md


@pytest.mark.reference
def test_the_torch_anchor_is_our_unet_and_loss():
  """Our parameters in the anchor's PyTorch UNet give our logits (both BatchNorm modes)
  and our Dice+BCE: the two sides of the comparison compute the same thing."""
  torch = pytest.importorskip('torch')
  sys.path.insert(0, os.path.join(ROOT, 'experiments'))
  import torch_anchor
  model = models.UNet2D(base=4, levels=3)
  params, stats = models.init(model, jax.random.PRNGKey(0), (16, 16, 3))
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(2, 16, 16, 3)).astype(np.float32)
  stats = jax.tree.map(lambda v: v + rng.uniform(0.1, 0.5, v.shape).astype(np.float32), stats)
  net = torch_anchor.load_flax(torch_anchor.UNet2D(4, 3), params, stats)
  to_torch = lambda a: torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 1)))
  variables = {'params': params, 'batch_stats': stats}
  for train in (False, True):
    if train:   # normalised by the batch's statistics
      want, _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
    else:       # by the running ones
      want = model.apply(variables, x, train=False)
    want = np.asarray(want)
    got = np.moveaxis(net.train(train)(to_torch(x)).detach().numpy(), 1, -1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  y = (rng.uniform(size=(2, 16, 16, 1)) > 0.7).astype(np.float32)
  logits = rng.normal(size=(2, 16, 16, 1)).astype(np.float32)
  np.testing.assert_allclose(torch_anchor.dice_bce(to_torch(logits), to_torch(y)).numpy(),
                             losses.dice_bce(logits, y), rtol=1e-5)
