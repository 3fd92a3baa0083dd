import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pflresfim_jax import build, config as config_lib, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
         '--config.local_epochs=1', '--config.model.base=2', '--config.model.levels=3', '--config.phantom.image_size=16',
         '--config.phantom.num_sites=2', '--config.eval.batch_size=4']
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env.pop('JAX_NUM_CPU_DEVICES', None)
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'built-in phantom' in proc.stderr
  # engine.cpu_devices (default 2) split the host before JAX started: one client each.
  assert 'client axis map, 2 device(s) (2 clients padded to 2)' in proc.stderr
  assert 'xla_bridge' not in proc.stderr   # JAX's start-up INFO lines stay quiet
  assert '| method | PhantomA | PhantomB | mean |' in proc.stdout
  md = (workdir / 'results.md').read_text().splitlines()
  assert md[2].startswith('| local |') and md[3].startswith('| fedavg |') and '±' in md[3]
  lines = (workdir / 'fedavg' / 'seed1' / 'metrics.jsonl').read_text().splitlines()
  assert len(lines) == 2
  rec = json.loads(lines[-1])
  assert rec['round'] == 1 and len(rec['val']['dice']) == 2 and 0 <= rec['val']['dice'][0] <= 1
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['rounds'] == 2 and saved['engine']['cpu_devices'] == 2


def test_main_reports_bad_config(tmp_path):
  cmd = [sys.executable, os.path.join(ROOT, 'experiments', 'main.py'),
         f'--config={os.path.join(ROOT, "configs", "vessel.py")}', f'--workdir={tmp_path}',
         '--config.method=fedfoo']
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and 'config.method' in proc.stderr and 'fedfoo' in proc.stderr


# ------------------------------------------------------------------ runs that survive
TINY = ['--config.method=pfl_resfim', '--config.rounds=4', '--config.local_epochs=1',
        '--config.model.base=2', '--config.model.levels=2', '--config.phantom.image_size=16', '--config.phantom.num_sites=2',
        '--config.eval.batch_size=4', '--config.fisher.num_examples=4', '--config.fisher.chunk_size=2',
        '--config.spectral.ratio=0.1', '--config.checkpoint.every=1', '--config.checkpoint.keep=2',
        '--config.model.conv=xla']


def _main(workdir, *extra):
  return [sys.executable, os.path.join(ROOT, 'experiments', 'main.py'),
          f'--config={os.path.join(ROOT, "configs", "vessel.py")}', f'--workdir={workdir}', *TINY, *extra]


def _lines(path):
  return len(path.read_text().splitlines()) if path.exists() else 0


def _start_and_signal(cmd, sig, when, log_path, timeout=600, delay=0.0):
  """Start ``cmd``; send ``sig`` ``delay`` s after ``when()`` holds; return
  (returncode, output, seconds from the signal to the exit)."""
  import time
  with open(log_path, 'w') as log:   # a file, not a pipe: a full pipe would stall the run
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while not when() and proc.poll() is None and time.time() < deadline:
      time.sleep(0.02)
    time.sleep(delay)
    ended_early = proc.poll() is not None
    if not ended_early:
      proc.send_signal(sig)
    sent = time.time()
    proc.wait(timeout=timeout)
  out = open(log_path).read()
  assert not ended_early, 'the run ended before it could be interrupted: ' + out[-2000:]
  return proc.returncode, out, time.time() - sent


def _steps(run):
  return sorted(int(d) for d in os.listdir(run / 'checkpoints') if d.isdigit())


def test_interrupt_kill_resume_equals_straight_run(tmp_path):
  """SIGTERM in the middle of a round stops at once and saves the last completed round
  (nothing else would: checkpoint.every=100); Ctrl-C lets the round in flight finish and
  saves it; SIGKILL loses nothing a checkpoint held; resuming each time gives
  byte-identical results and per-round metrics to a straight run; the report is
  rebuilt from the files alone."""
  import signal
  # Rounds of ~1-2 s (10 local epochs, compact loops) so a signal can land inside one.
  run_args = ('--config.rounds=6', '--config.local_epochs=10', '--config.engine.unroll=false')
  straight, broken = tmp_path / 'straight', tmp_path / 'broken'
  proc = subprocess.run(_main(straight, *run_args), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  run = broken / 'pfl_resfim' / 'seed0'
  metrics = run / 'metrics.jsonl'

  rc, err, took = _start_and_signal(
      _main(broken, *run_args, '--config.checkpoint.every=100', '--config.checkpoint.stop_grace=0'),
      signal.SIGTERM, lambda: _lines(metrics) >= 1, tmp_path / 'term.log', delay=0.3)
  assert rc == 128 + signal.SIGTERM, err[-3000:]
  assert 'the round in flight was abandoned' in err and 'run the same command again' in err
  assert took < 30, took
  assert _steps(run) == [_lines(metrics) - 1] and _lines(metrics) <= 2   # the last completed round

  done = _lines(metrics)
  rc, err, _ = _start_and_signal(_main(broken, *run_args, '--config.checkpoint.every=100'),
                                 signal.SIGINT, lambda: _lines(metrics) > done, tmp_path / 'int.log')
  assert rc == 130, err[-3000:]
  assert 'resuming after round' in err and 'stopped after round' in err
  assert not (run / 'result.json').exists()
  assert _steps(run)[-1] == _lines(metrics) - 1 <= 3   # the round it stopped after

  rc, err, _ = _start_and_signal(_main(broken, *run_args), signal.SIGKILL,
                                 lambda: _lines(metrics) >= _steps(run)[-1] + 2, tmp_path / 'kill.log')
  assert rc == -signal.SIGKILL and not (run / 'result.json').exists()

  proc = subprocess.run(_main(broken, *run_args), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (broken / 'results.csv').read_bytes() == (straight / 'results.csv').read_bytes()
  assert metrics.read_bytes() == (straight / 'pfl_resfim' / 'seed0' / 'metrics.jsonl').read_bytes()
  assert 'PhantomA' in (broken / 'results.csv').read_text().splitlines()[0]
  assert not any(c in (broken / 'results.csv').read_text() for c in ('/', 'time', ':'))

  # The report was written at the end, and experiments/report.py rebuilds it from the files.
  for name in ('report.md', 'report.html', 'report/dice_curves.png', 'report/local_layers.png',
               'report/predictions.png'):
    (broken / name).unlink()
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'experiments', 'report.py'),
                         f'--workdir={tmp_path / "nothing"}'], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1 and 'config.json not found' in proc.stderr
  from pflresfim_jax import report
  assert report.build(str(broken)) == str(broken / 'report.md')
  md = (broken / 'report.md').read_text()
  assert '| pfl_resfim |' in md and 'report/local_layers.png' in md and 'report/predictions.png' in md
  for png in ('dice_curves', 'local_layers', 'predictions'):
    assert (broken / 'report' / f'{png}.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  html_text = (broken / 'report.html').read_text()
  assert html_text.count('data:image/png;base64,') == 3 and '<td>pfl_resfim</td>' in html_text
  assert list((broken / 'pfl_resfim' / 'seed0' / 'tensorboard').iterdir())


def test_workdir_with_another_config_is_refused(tmp_path, capsys):
  a = config_lib.base_config()
  train.prepare_workdir(build.resolve(a), str(tmp_path))
  b = config_lib.base_config()
  b.rounds, b.lr = 20, 0.01
  # No training output yet (e.g. the first try stopped on a data error): replaced.
  assert train.prepare_workdir(build.resolve(b), str(tmp_path)) == str(tmp_path)
  train.prepare_workdir(build.resolve(a), str(tmp_path))
  saved = (tmp_path / 'config.json').read_text()
  (tmp_path / 'pfl_resfim' / 'seed0').mkdir(parents=True)
  (tmp_path / 'pfl_resfim' / 'seed0' / 'metrics.jsonl').write_text('{}\n')
  with pytest.raises(ValueError) as e:
    train.prepare_workdir(build.resolve(b), str(tmp_path))
  assert 'rounds: 16 in the workdir, 20 now' in str(e.value) and 'lr: 0.003' in str(e.value)
  assert 'resume=false' in str(e.value)
  c = config_lib.base_config()
  c.method, c.seeds, c.checkpoint.every = 'fedavg', '0,1', 2     # do not change results: resumable
  assert train.prepare_workdir(build.resolve(c), str(tmp_path)) == str(tmp_path)
  b.resume = False
  fresh = train.prepare_workdir(build.resolve(b), str(tmp_path))
  assert fresh == str(tmp_path / 'run-2')
  assert json.loads((tmp_path / 'run-2' / 'config.json').read_text())['rounds'] == 20
  assert json.loads(saved)['rounds'] == json.loads((tmp_path / 'config.json').read_text())['rounds'] == 16


def test_full_workdir_fails_before_training(tmp_path, monkeypatch):
  from collections import namedtuple
  from pflresfim_jax import checkpoint
  usage = namedtuple('usage', 'total used free')
  monkeypatch.setattr(checkpoint.shutil, 'disk_usage', lambda p: usage(1, 1, 1000))
  from fed_helpers import tiny_config
  with pytest.raises(ValueError, match='MiB free, but the run needs'):
    train.train_and_evaluate(tiny_config(method='local'), str(tmp_path))
  assert not list(tmp_path.rglob('metrics.jsonl'))


def test_non_finite_stops_with_round_and_client_keeping_last_checkpoint(tmp_path):
  import jax
  import jax.numpy as jnp
  from fed_helpers import tiny_config, tiny_fed
  cfg = tiny_config(method='local', rounds=4, **{'checkpoint.every': 1})
  fed = tiny_fed(16, 3)
  init_fn, round_fn = build.compile_method(cfg, fed, 'local')

  def poisoned(state, data, bank, key, rnd):  # client 1 blows up in round 2
    if int(rnd) == 2:
      state = {**state, 'params': jax.tree.map(lambda x: x.at[1].multiply(jnp.inf), state['params'])}
    return round_fn(state, data, bank, key, rnd)

  with pytest.raises(train.Diverged) as e:
    train.run_one(cfg, fed, 'local', 0, str(tmp_path), compiled=(init_fn, poisoned))
  msg = str(e.value)
  assert 'round 2' in msg and fed.clients[1] in msg and fed.clients[0] not in msg
  assert 'after round 1' in msg
  assert sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit())[-1] == 1
  assert _lines(tmp_path / 'metrics.jsonl') == 2 and not (tmp_path / 'result.json').exists()


# Val Dice per round (rows) and client (columns) the scripted rounds report: client 0
# peaks at round 3 (and at round 0, before any window), client 1 ties at rounds 4 and 5,
# client 2 never rises above 0.
SCRIPTED_VAL = np.array([[0.9, 0.1, 0.0], [0.1, 0.2, 0.0], [0.2, 0.3, 0.0],
                         [0.5, 0.4, 0.0], [0.4, 0.6, 0.0], [0.3, 0.6, 0.0]], np.float32)


@pytest.mark.parametrize('record_from, first', [('half', 3), ('after_half', 4)])
def test_test_metrics_are_recorded_at_each_clients_best_val_dice_of_the_window(tmp_path, record_from, first):
  """METHOD.md 7, against metrics.jsonl: a client's result is its test Dice of the first
  round of its highest val Dice in rounds first..T-1 (T//2, or T//2 + 1 as main_seg.py)."""
  import jax.numpy as jnp
  from fed_helpers import tiny_config, tiny_fed
  cfg = build.resolve(tiny_config(method='local', rounds=6, **{'eval.record_from': record_from}))
  fed = tiny_fed(16, 3)
  init_fn, round_fn = build.compile_method(cfg, fed, 'local')   # the same program for both

  def scripted(state, data, bank, key, rnd):
    state, m = round_fn(state, data, bank, key, rnd)
    return state, {**m, 'val': {**m['val'], 'dice': jnp.asarray(SCRIPTED_VAL[int(rnd)])}}

  res = train.run_one(cfg, fed, 'local', 0, str(tmp_path), compiled=(init_fn, scripted))
  recs = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  np.testing.assert_array_equal([r['val']['dice'] for r in recs], SCRIPTED_VAL)
  best = first + np.argmax(SCRIPTED_VAL[first:], 0)             # np.argmax: the first maximum
  assert best.tolist() == ([3, 4, 3] if record_from == 'half' else [4, 4, 4])
  np.testing.assert_array_equal(res['best_round'], best)
  want = [100 * np.float32(recs[r]['test']['dice'][k]) for k, r in enumerate(best)]
  np.testing.assert_allclose(res['test_dice'], want, rtol=1e-6)


def test_record_takes_each_clients_strictly_better_rounds_against_a_loop():
  rng = np.random.default_rng(0)
  k, rounds = 5, 7
  val = rng.choice([0.1, 0.5, 0.9], (rounds, k)).astype(np.float32)   # ties on purpose
  test = rng.random((rounds, k)).astype(np.float32)
  best_val, best_round, recorded = np.full(k, -1.0, np.float32), np.full(k, -1), {}
  for rnd in range(rounds):
    m = {'val': {'dice': val[rnd]}, 'test': {'dice': test[rnd], 'iou': test[rnd] / 2}}
    best_val, best_round, recorded = train._record(rnd, m, best_val, best_round, recorded)
  for c in range(k):
    best, at = -1.0, -1
    for rnd in range(rounds):
      if val[rnd, c] > best:
        best, at = val[rnd, c], rnd
    assert best_round[c] == at and best_val[c] == best
    assert recorded['dice'][c] == test[at, c] and recorded['iou'][c] == test[at, c] / 2


def test_round_prepared_ahead_is_the_one_the_rounds_run(tmp_path, monkeypatch):
  """_train_methods prepares the round from abstract arguments (the initial state's
  eval_shape, build.bank_spec) before the bank exists: the rounds must then run that
  program, not compile a second one for a signature that differs."""
  from fed_helpers import tiny_config
  made = []

  def compile_method(*args, **kwargs):
    made.append(real(*args, **kwargs))
    return made[-1]
  real = build.compile_method
  monkeypatch.setattr(build, 'compile_method', compile_method)
  cfg = tiny_config(method='fedavg', **{'report.enabled': False})
  out = train.train_and_evaluate(cfg, str(tmp_path))
  assert out['methods']['fedavg']['per_seed'][0]['test_dice'].shape == (3,)
  (init, round_fn), = made
  assert init._cache_size() == 1 and round_fn._cache_size() == 1
