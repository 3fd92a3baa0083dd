"""distributed: two processes joined by jax.distributed (CPU, gloo, coordinator on
127.0.0.1) run the same phantom rounds as one process with as many devices."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from pflresfim_jax import config as config_lib, distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config.rounds=2', '--config.phantom.num_sites=3', '--config.phantom.image_size=16',
        '--config.model.base=2', '--config.model.levels=2', '--config.local_epochs=1', '--config.batch_size=4',
        '--config.fisher.num_examples=4', '--config.fisher.chunk_size=2',
        '--config.spectral.ratio=0.1', '--config.eval.batch_size=4', '--config.lr=1e-6',
        '--config.report.enabled=false', '--config.method=pfl_resfim',
        '--config.engine.client_axis=vmap', '--config.engine.unroll=false', '--config.model.conv=xla',
        '--config.tensorboard=false']


def _main(workdir, devices, extra=()):
  env = {**os.environ, 'XLA_FLAGS': os.environ.get('XLA_FLAGS', '') +
         f' --xla_force_host_platform_device_count={devices}'}
  return subprocess.Popen([sys.executable, os.path.join(ROOT, 'experiments', 'main.py'),
                           f'--config={ROOT}/configs/vessel.py', f'--workdir={workdir}', *TINY, *extra],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _records(workdir):
  with open(os.path.join(workdir, 'pfl_resfim', 'seed0', 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_bad_local_device_ids_are_named():
  c = config_lib.base_config()
  c.cluster.local_device_ids = 'a,b'
  with pytest.raises(ValueError, match='cluster.local_device_ids'):
    distributed.initialize(c)


def test_two_processes_match_one_process(tmp_path):
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  single = _main(tmp_path / 'one', 4, ['--config.engine.devices=4'])
  cluster = ['--config.distributed=true', f'--config.cluster.coordinator_address=127.0.0.1:{port}',
             '--config.cluster.num_processes=2']
  procs = [_main(tmp_path / 'two', 2, [*cluster, f'--config.cluster.process_id={i}'])
           for i in range(2)]
  outs = []
  try:
    for p in [single, *procs]:
      outs.append(p.communicate(timeout=900)[0])
  finally:
    for p in [single, *procs]:
      if p.poll() is None:
        p.kill()
  for p, out in zip([single, *procs], outs):
    assert p.returncode == 0, out[-3000:]
  assert 'Test Dice' in outs[1] and 'Test Dice' not in outs[2]   # process 0 speaks
  one, two = _records(tmp_path / 'one'), _records(tmp_path / 'two')
  assert [r['round'] for r in two] == [0, 1]
  # One SPMD program over 4 devices in 1 or 2 processes: the same per-device code and
  # the same all-reduces (over gloo or in-process), so only the last bits may move.
  for a, b in zip(one, two):
    for split in ('val', 'test'):
      np.testing.assert_allclose(a[split]['dice'], b[split]['dice'], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a['train_loss'], b['train_loss'], rtol=1e-5)
    np.testing.assert_allclose(a['local_fraction'], b['local_fraction'], rtol=1e-6)
  assert (tmp_path / 'two' / 'results.csv').exists()
  # Checkpoints of the sharded state were written by both processes together.
  assert any((tmp_path / 'two' / 'pfl_resfim' / 'seed0' / 'checkpoints').iterdir())
