import gzip
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'experiments'))
import trace_summary  # noqa: E402


def _trace(path, events):
  with gzip.open(path, 'wt') as f:
    json.dump({'displayTimeUnit': 'ns', 'traceEvents': events}, f)
  return str(path)


def _meta(pid, name):
  return {'ph': 'M', 'pid': pid, 'name': 'process_name', 'args': {'name': name}}


def test_device_time_by_op_and_kind(tmp_path):
  """GPU kernels count by their HLO op (summed over launches), host events do not; kinds
  come from the op's and the kernel's names."""
  gpu, host = 7, 1
  events = [_meta(gpu, '/device:GPU:0'), _meta(host, '/host:CPU'),
            {'ph': 'X', 'pid': host, 'ts': 0.0, 'dur': 1000.0, 'name': 'PjitFunction(round)'},
            {'ph': 'X', 'pid': gpu, 'ts': 10.0, 'dur': 300.0, 'name': 'sm90_xmma_fprop_implicit',
             'args': {'hlo_op': 'custom-call.3'}},
            {'ph': 'X', 'pid': gpu, 'ts': 400.0, 'dur': 100.0, 'name': 'sm90_xmma_fprop_implicit',
             'args': {'hlo_op': 'custom-call.3'}},
            {'ph': 'X', 'pid': gpu, 'ts': 500.0, 'dur': 50.0, 'name': 'loop_convert_fusion',
             'args': {'hlo_op': 'convert_fusion.1'}},
            {'ph': 'X', 'pid': gpu, 'ts': 560.0, 'dur': 50.0, 'name': 'ncclAllReduceKernel',
             'args': {'hlo_op': 'all-reduce.2'}}]
  text = trace_summary.summary(_trace(tmp_path / 't.json.gz', events))
  assert '4 op launches, busy 0.5 ms over a span of 0.6 ms' in text
  assert '| convolution | 0.4 | 80.0% |' in text
  assert '| custom-call.3 | convolution | 2 | 0.40 | 80.0% |' in text
  assert '| convert_fusion.1 | fusion | 1 | 0.05 | 10.0% |' in text
  assert '| all-reduce.2 | collective | 1 | 0.05 | 10.0% |' in text
  assert 'PjitFunction' not in text


def test_cpu_thunks_count_by_hlo_op(tmp_path):
  events = [_meta(1, '/host:CPU'),
            {'ph': 'X', 'pid': 1, 'ts': 0.0, 'dur': 20.0, 'name': 'dot.4', 'args': {'hlo_op': 'dot.4'}},
            {'ph': 'X', 'pid': 1, 'ts': 30.0, 'dur': 1.0, 'name': 'end: dot.4'}]
  text = trace_summary.summary(_trace(tmp_path / 't.json.gz', events))
  assert '| dot.4 | dot | 1 | 0.02 | 100.0% |' in text and 'end:' not in text


def test_a_trace_without_device_ops_names_the_file(tmp_path):
  path = _trace(tmp_path / 'empty.json.gz', [_meta(1, '/host:CPU')])
  with pytest.raises(ValueError, match='empty.json.gz: no device op events'):
    trace_summary.summary(path)
