"""Where a traced program's device time goes: ``python experiments/trace_summary.py TRACE``.

TRACE is a ``perfetto_trace.json.gz`` written by ``jax.profiler.trace(...,
create_perfetto_trace=True)`` (``benchmark.py --trace=DIR`` writes one per full-round row,
under DIR/<setting>/plugins/profile/<time>/). Prints, for the device's op events (GPU
kernels on '/device:...' processes; on a CPU, the thunks that carry an ``hlo_op``): the
busy time, the span from first to last op, and the ops with the most time, summed over
their launches, each with its share and a kind read off its name (convolution, dot,
fusion, copy, collective, other; from the HLO op's name and the kernel's). On a CPU, loop
thunks ('while') contain their bodies' thunks, so there busy can exceed the span.
Nothing here needs TensorBoard or xprof.
"""
import collections
import gzip
import json
import sys

KINDS = (('collective', ('all-reduce', 'all-gather', 'reduce-scatter', 'collective', 'all-to-all')),
         ('convolution', ('convolution', 'conv_general', 'cudnn', 'convolve', 'fprop', 'dgrad',
                          'wgrad')),
         ('dot', ('gemm', 'dot', 'cublas', 'matmul')),
         ('copy', ('copy', 'transpose', 'memcpy', 'memset')),
         ('fusion', ('fusion',)))


def kind(name: str) -> str:
  """The op's kind by its name (the first match in KINDS, else 'other')."""
  low = name.lower()
  return next((k for k, keys in KINDS if any(key in low for key in keys)), 'other')


def device_ops(events: list) -> list:
  """The op events of devices: [(HLO op name, kernel/event name, start us, duration us)]."""
  names = {e['pid']: e['args']['name'] for e in events
           if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  ops = []
  for e in events:
    if e.get('ph') != 'X':
      continue
    args = e.get('args', {})
    on_device = names.get(e.get('pid'), '').startswith('/device:')
    if on_device or 'hlo_op' in args:
      ops.append((args.get('hlo_op') or e['name'], e['name'], float(e['ts']), float(e['dur'])))
  return ops


def summary(path: str, top: int = 25) -> str:
  """A Markdown table of the trace's device time by op (see the module docstring)."""
  with gzip.open(path, 'rt') as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  ops = device_ops(events)
  if not ops:
    raise ValueError(f'{path}: no device op events in this trace')
  busy = sum(op[3] for op in ops)
  span = max(t + d for *_, t, d in ops) - min(op[2] for op in ops)
  by_op, count, by_kind, kinds = (collections.Counter(), collections.Counter(),
                                  collections.Counter(), {})
  for name, event, _, d in ops:
    kinds.setdefault(name, kind(f'{name} {event}'))
    by_op[name] += d
    count[name] += 1
    by_kind[kinds[name]] += d
  lines = [f'{path}: {len(ops)} op launches, busy {busy / 1e3:.1f} ms over a span of '
           f'{span / 1e3:.1f} ms', '',
           '| kind | ms | share |', '|---|---|---|']
  lines += [f'| {k} | {d / 1e3:.1f} | {d / busy:.1%} |' for k, d in by_kind.most_common()]
  lines += ['', '| op | kind | launches | ms | share |', '|---|---|---|---|---|']
  lines += [f'| {name[:90]} | {kinds[name]} | {count[name]} | {d / 1e3:.2f} | {d / busy:.1%} |'
            for name, d in by_op.most_common(top)]
  return '\n'.join(lines)


if __name__ == '__main__':
  if len(sys.argv) < 2:
    sys.exit(__doc__)
  for p in sys.argv[1:]:
    print(summary(p))
