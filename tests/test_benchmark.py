import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_quick_smoke(tmp_path):
  """The benchmark runs in quick mode and writes its table (no timing is asserted)."""
  out = tmp_path / 'bench'
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'experiments', 'benchmark.py'), '--quick',
                         '--method=fedavg', '--client_axis=vmap,map', f'--out={out}'], capture_output=True, text=True, timeout=900,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads((tmp_path / 'bench.json').read_text())['rows']
  assert len(rows) == 4 + 3 + 2 * (2 + 4) and all(r['value'] > 0 for r in rows)
  md = (tmp_path / 'bench.md').read_text()
  assert '| train step, client_axis=map, bf16 |' in md
  for axis in ('vmap', 'map'):
    assert f'full round, fedavg, fp32, 1 device(s), client_axis={axis}' in md
    for part in ('temp', 'arguments', 'outputs', 'peak'):
      assert f'round memory per device (XLA analysis), {part}, fp32, 1 device(s), client_axis={axis}' in md
  assert 'peak device memory: n/a on this backend' in md
