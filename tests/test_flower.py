"""flower: the real Flower components on loopback (SuperLink, one SuperNode per
hospital, ``flwr run``), two phantom clients, two rounds."""
import json
import os
import signal
import socket
import subprocess
import time

import pytest

pytest.importorskip('flwr')

from pflresfim_jax import flower  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ('rounds=2;phantom.num_sites=2;phantom.image_size=16;model.base=2;local_epochs=1;'
        'batch_size=4;fisher.num_examples=4;fisher.chunk_size=2;spectral.ratio=0.1;'
        'eval.batch_size=4;engine.client_axis=map;engine.unroll=false')


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _wait_for_port(port, seconds=60):
  deadline = time.time() + seconds
  while time.time() < deadline:
    with socket.socket() as s:
      if s.connect_ex(('127.0.0.1', port)) == 0:
        return
    time.sleep(0.5)
  raise TimeoutError(f'nothing listens on 127.0.0.1:{port} after {seconds} s')


def test_messages_round_trip_through_flower_records():
  import numpy as np
  arrays = {'params/a#mask': np.packbits(np.array([1, 0, 1], bool)),
            'params/a': np.arange(2, dtype=np.float32), 'weight': np.asarray(3.0, np.float32)}
  kind, meta, back = flower.from_content(flower.to_content('train', {'round': 4}, arrays))
  assert kind == 'train' and meta == {'round': 4}
  for k, v in arrays.items():
    np.testing.assert_array_equal(back[k], v)
    assert back[k].dtype == v.dtype


def test_load_config_applies_overrides_and_names_bad_fields(tmp_path):
  cfg = flower.load_config(os.path.join(ROOT, 'configs', 'vessel.py'), TINY)
  assert cfg.rounds == 2 and cfg.model.base == 2 and cfg.phantom.num_sites == 2
  with pytest.raises(FileNotFoundError, match='config-file'):
    flower.load_config(str(tmp_path / 'missing.py'))
  with pytest.raises(ValueError, match='no_such'):
    flower.load_config(os.path.join(ROOT, 'configs', 'vessel.py'), 'no_such=1')


def test_superlink_supernodes_and_flwr_run_on_loopback(tmp_path):
  home = tmp_path / 'flwr-home'
  home.mkdir()
  port = _free_port()
  (home / 'config.toml').write_text(
      f'[superlink]\ndefault = "loop"\n\n[superlink.loop]\naddress = "127.0.0.1:{port}"\n'
      'insecure = true\n')
  env = {**os.environ, 'FLWR_HOME': str(home), 'FLWR_DISABLE_UPDATE_CHECK': '1',
         'PYTHONUNBUFFERED': '1'}
  procs, logs = [], []

  def start(name, cmd):
    log = open(tmp_path / f'{name}.log', 'w')
    logs.append((name, tmp_path / f'{name}.log'))
    procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  cwd=str(tmp_path), start_new_session=True))

  workdir = tmp_path / 'server'
  try:
    start('superlink', ['flower-superlink', '--insecure', '--disable-runtime-dependency-installation',
                        '--port', str(port)])
    _wait_for_port(port)
    for k in range(2):
      start(f'supernode{k}', ['flower-supernode', '--insecure', '--superlink', f'127.0.0.1:{port}',
                              '--port', str(_free_port()), '--max-wait-time', '120',
                              '--node-config', f'client-index={k} state-dir="{tmp_path}/client{k}"'])
    run_config = (f'config-file="{ROOT}/configs/vessel.py" overrides="{TINY}" method="pfl_resfim" '
                  f'num-clients=2 min-clients=2 round-timeout=600.0 wait-timeout=120.0 '
                  f'workdir="{workdir}"')
    run = subprocess.run(['flwr', 'run', os.path.join(ROOT, 'experiments', 'flower_app'), 'loop',
                          '--stream', '--run-config', run_config],
                         env=env, capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
    output = run.stdout + run.stderr
    result_path = workdir / 'flower-result.json'
    assert result_path.exists(), output[-4000:] + ''.join(
        f'\n--- {n}\n' + p.read_text()[-2000:] for n, p in logs)
    result = json.loads(result_path.read_text())
    assert result['clients'] == ['PhantomA', 'PhantomB']
    assert [r['clients'] for r in result['rounds']] == [[0, 1], [0, 1]]
    assert all(0.0 <= d <= 1.0 for r in result['rounds'] for d in r['test_dice'])
    assert {k: v['round'] for k, v in result['final'].items()} == {'0': 1, '1': 1}
    assert result['wire']['train_up'] > 0
    assert 'wrote' in output
    # Each hospital's state stayed in its own folder.
    for k in range(2):
      (state,) = [d for d in (tmp_path / f'client{k}').iterdir() if d.name.startswith('pfl_resfim')]
      assert (state / 'committed.npz').exists() and not (state / 'pending.npz').exists()
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
    deadline = time.time() + 30
    for p in procs:
      try:
        p.wait(timeout=max(1.0, deadline - time.time()))
      except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  assert all(p.poll() is not None for p in procs)
