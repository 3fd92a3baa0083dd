"""Throughput benchmark: ``python experiments/benchmark.py [--quick] [--out=bench.json]``.

Measures on whatever backend JAX finds:
* training images/s of one local step for K clients x batch B at size S (the clients
  split over each device count of --step_devices), for each
  ``engine.client_axis`` strategy and precision;
* per-example Fisher examples/s (``fisher.diagonal``) for several chunk sizes, the same
  with ``fisher.grads='layers'`` (fisher_layers.py), against a Python loop of batch-1
  jitted gradients;
* one full round of a method (local training + ResFIM + aggregation + evaluation, the
  trainer's own jitted round) on a Fed-Vessel-sized phantom, in seconds, for each
  device count in --devices (default: every device; on the CPU --cpu_devices, default 2 as
  the trainer's engine.cpu_devices, or XLA_FLAGS=--xla_force_host_platform_device_count=8),
  and the protocol time it implies (compile + T rounds), for each strategy in
  --client_axis, with XLA's compiled memory analysis of that round per device (temp,
  arguments, outputs; any backend; and peak, except on a CPU, where XLA leaves the
  temporaries out of it);
* peak device memory (where the backend reports it);
* with ``--trace=DIR``, a profiler trace of one more round per full-round row
  (``experiments/trace_summary.py`` says which ops take the device's time);
* with ``--anchor=torch`` (torch importable; else reported as skipped), the same UNet in
  PyTorch in the same run (experiments/torch_anchor.py): a training step as the
  authors' loop (one model and Adam per client) and torch.func per-example gradients,
  with the thread counts, and our rate over theirs.
Writes JSON and a Markdown table with the device, versions and settings. ``--quick``
uses a tiny model (3 levels) and images (a CI smoke test; its numbers mean little).
"""
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pflresfim_jax import (build, config as config_lib, fisher, fisher_layers, losses,  # noqa: E402
                           models, sweep)
from pflresfim_jax.clients import engine, sharding  # noqa: E402
from pflresfim_jax.data import phantom  # noqa: E402

flags.DEFINE_bool('quick', False, 'tiny sizes (CPU smoke test)')
flags.DEFINE_integer('clients', 6, 'K')
flags.DEFINE_integer('batch', 8, 'B per client')
flags.DEFINE_integer('size', 256, 'S')
flags.DEFINE_integer('base', 16, 'UNet base width')
flags.DEFINE_integer('levels', 5, 'UNet resolution levels (5: the reference)')
flags.DEFINE_integer('repeats', 5, 'timed repetitions')
flags.DEFINE_string('out', 'benchmark', 'output path stem (.json and .md)')
flags.DEFINE_string('method', 'pfl_resfim', 'method of the full-round rows')
flags.DEFINE_integer('images', 40, 'images per client for the full round (train ~56%: Fed-Vessel-sized)')
flags.DEFINE_integer('rounds', 200, 'T for the protocol estimate')
flags.DEFINE_string('devices', 'all', "device counts for the full-round rows, e.g. '1,2,4,8' ('all': every device)")
flags.DEFINE_integer('cpu_devices', 2, 'XLA devices the host CPU is split into (engine.cpu_devices)')
flags.DEFINE_string('precision', 'fp32', "precision(s) of the full-round rows, e.g. 'fp32,bf16'")
flags.DEFINE_string('step_axis', 'vmap,map', "engine.client_axis strategies of the train-step rows")
flags.DEFINE_string('step_devices', '1', "device counts of the train-step rows, e.g. '1,2' ('all': every "
                    "device; the CPU's default round splits its clients over engine.cpu_devices=2)")
flags.DEFINE_string('trace', '', 'folder: trace one more round of each full-round row there '
                    '(jax.profiler, with a perfetto trace; experiments/trace_summary.py reads it)')
flags.DEFINE_multi_string('set', [], "config overrides for the full-round rows, e.g. --set=fisher.chunk_size=1")
flags.DEFINE_string('parts', 'step,fisher,round', 'which groups of rows to measure')
flags.DEFINE_string('client_axis', 'auto', "engine.client_axis of the full-round rows, e.g. 'vmap,map'")
flags.DEFINE_string('conv', 'auto', "model.conv of the step and Fisher rows, e.g. 'xla,im2col'")
flags.DEFINE_enum('anchor', '', ['', 'torch'], "'torch': measure the PyTorch anchor too (step, fisher)")
flags.DEFINE_integer('torch_threads', 0, "the anchor's torch.set_num_threads (0: the number of CPUs)")
FLAGS = flags.FLAGS


def timed(fn, *args, repeats):
  jax.block_until_ready(fn(*args))  # compile + warm up
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats


def train_step_rate(k, b, s, base, strategy, precision, repeats, conv, devices=1):
  """Images/s of one local step of K clients, the clients split over ``devices`` devices
  (each runs its K / devices clients with ``strategy``, as the round does)."""
  mesh = sharding.client_mesh(devices)
  model = models.UNet2D(base=base, dtype=jnp.bfloat16 if precision == 'bf16' else jnp.float32,
                        levels=FLAGS.levels, conv=conv)
  params, stats = models.init(model, jax.random.PRNGKey(0), (s, s, 3))
  tx = engine.optimizer(5e-4)
  step = engine.train_step(engine.seg_loss(model), tx)
  stack = lambda t: jax.tree.map(lambda x: jnp.broadcast_to(x, (k, *x.shape)), t)
  carry = stack((params, stats, tx.init(params)))
  x = jax.random.uniform(jax.random.PRNGKey(1), (k, b, s, s, 3))
  y = (x[..., :1] > 0.5).astype(jnp.float32)
  carry, x, y = sharding.put_clients((carry, x, y), mesh)
  fn = jax.jit(lambda c, x, y: engine.map_clients(
      lambda cc, xx, yy: step(cc, None, {'image': xx, 'label': yy}, None, 1e-3), strategy, c, x, y,
      mesh=mesh))
  return k * b / timed(fn, carry, x, y, repeats=repeats)


def fisher_rates(n, s, base, chunks, repeats, conv):
  model = models.UNet2D(base=base, levels=FLAGS.levels, conv=conv)
  params, stats = models.init(model, jax.random.PRNGKey(0), (s, s, 3))
  apply_fn = models.inference_fn(model)
  loss = lambda p, ex: losses.bce(apply_fn(p, stats, ex['image'][None])[0], ex['label'])
  x = jax.random.uniform(jax.random.PRNGKey(1), (n, s, s, 3))
  batch = {'image': x, 'label': (x[..., :1] > 0.5).astype(jnp.float32)}
  unroll = engine.resolve_unroll('auto')
  out = {}
  for c in chunks:
    fn = jax.jit(lambda p, bt, c=c: fisher.diagonal(loss, p, bt, c, unroll=unroll))
    out[f'vmap(grad) chunk {c}'] = n / timed(fn, params, batch, repeats=repeats)
  # fisher.grads='layers': one batched backward pass per chunk (fisher_layers.py).
  squares = fisher_layers.squares_fn(model, {'params': params, 'batch_stats': stats}, losses.bce,
                                     {'train': False})
  one = lambda t: jax.tree.map(lambda x: x[None], t)
  for c in [c for c in chunks if c > 1]:
    fn = jax.jit(lambda p, bt, c=c: fisher.accumulate(squares, p, one(bt), c, unroll=unroll))
    out[f'layers chunk {c}'] = n / timed(fn, params, batch, repeats=repeats)
  grad = jax.jit(jax.grad(loss))

  def loop(p, bt):
    acc = None
    for i in range(n):
      g = grad(p, {kk: v[i] for kk, v in bt.items()})
      sq = jax.tree.map(jnp.square, g)
      acc = sq if acc is None else jax.tree.map(jnp.add, acc, sq)
    return acc
  out['loop of batch-1 grad'] = n / timed(loop, params, batch, repeats=repeats)
  return out


def anchor_rows(k, b, s, base, n, repeats, ours):
  """The PyTorch anchor's rows and our rate over its rate (``ours``: rows so far), and
  a note for the table's header (threads, or why the anchor was skipped)."""
  try:
    import torch
    import torch_anchor
  except ImportError as e:
    return [], f'PyTorch anchor skipped: {e}'
  torch.set_num_threads(FLAGS.torch_threads or os.cpu_count())
  where = torch_anchor.device()
  note = (f'PyTorch {torch.__version__} anchor on {where}'
          + (f' ({torch.cuda.get_device_name()}, cudnn.benchmark)' if where.type == 'cuda' else '')
          + f': {torch.get_num_threads()} threads, JAX/XLA: {os.cpu_count()} CPUs')
  parts, rows = set(FLAGS.parts.split(',')), []
  if 'step' in parts:
    rate = torch_anchor.train_step_rate(k, b, s, base, FLAGS.levels, repeats)
    rows.append({'what': 'PyTorch anchor: train step, loop over clients, Adam, fp32',
                 'unit': 'images/s', 'value': rate})
    rows += [{'what': f'ours / PyTorch: {r["what"]}', 'unit': 'x', 'value': r['value'] / rate}
             for r in ours if r['what'].startswith('train step') and 'fp32' in r['what']]
  if 'fisher' in parts:
    rate = torch_anchor.fisher_rate(n, s, base, FLAGS.levels, repeats)
    rows.append({'what': f'PyTorch anchor: per-example Fisher, torch.func vmap(grad) ({n} examples)',
                 'unit': 'examples/s', 'value': rate})
    rows += [{'what': f'ours / PyTorch: {r["what"]}', 'unit': 'x', 'value': r['value'] / rate}
             for r in ours if r['what'].startswith(('per-example Fisher, vmap', 'per-example Fisher, layers'))]
  return rows, note


MEMORY = (('temp', 'temp_size_in_bytes'), ('arguments', 'argument_size_in_bytes'),
          ('outputs', 'output_size_in_bytes'), ('peak', 'peak_memory_in_bytes'))


def full_round(k, s, base, images, method, precision, devices, repeats, rounds, strategy):
  """One round of the trainer's jitted round: seconds, compile seconds, train images, and
  XLA's compiled memory analysis per device ({'temp': bytes, ...}, any backend)."""
  cfg = config_lib.base_config()
  cfg.model.base, cfg.engine.precision, cfg.rounds, cfg.method = base, precision, rounds, method
  cfg.engine.client_axis, cfg.model.levels = strategy, FLAGS.levels
  cfg.phantom.image_size, cfg.phantom.num_sites = s, k
  cfg = build.resolve(sweep.override(cfg, ';'.join(FLAGS.set), '--set'))
  fed = phantom.load(seed=0, image_size=s, num_sites=k, images_per_site=[images] * k)
  mesh = sharding.client_mesh(devices)
  data, bank = build.device_data(fed, mesh), build.spectral_bank(fed, cfg, mesh)
  init_fn, round_fn = build.compile_method(cfg, fed, method, mesh)
  key = jax.random.PRNGKey(0)
  state = init_fn(key)
  start = time.perf_counter()
  state, metrics = round_fn(state, data, bank, key, jnp.int32(0))
  jax.block_until_ready(metrics)
  first = time.perf_counter() - start
  start = time.perf_counter()
  for r in range(1, repeats + 1):
    state, metrics = round_fn(state, data, bank, jax.random.fold_in(key, r), jnp.int32(r))
  jax.block_until_ready(metrics)
  per_round = (time.perf_counter() - start) / repeats
  if FLAGS.trace:
    setting = f'{method}-{precision}-{devices}dev-{strategy}'
    with jax.profiler.trace(os.path.join(FLAGS.trace, setting), create_perfetto_trace=True):
      state, metrics = round_fn(state, data, bank, key, jnp.int32(repeats + 1))   # donated
      jax.block_until_ready(metrics)
  # The program the rounds ran (compile_method's round is a compile_cache.Stored): its
  # memory analysis without compiling it again.
  stats = round_fn.compiled(state, data, bank, key, jnp.int32(0)).memory_analysis()
  memory = {name: getattr(stats, attr, None) for name, attr in MEMORY} if stats else {}
  if jax.default_backend() == 'cpu':
    # XLA:CPU's 'peak' leaves the temporaries out (the phantom round: 37.2 MiB, its
    # arguments, against 88.3 MiB of temporaries, 2026-12-04): not a peak there.
    memory.pop('peak', None)
  return per_round, max(0.0, first - per_round), int(fed.train.counts.sum()), memory


def write(info, rows, dev) -> str:
  """Write FLAGS.out's .json and .md with the rows so far (after every group of rows, so a
  run stopped at a time limit keeps what it measured); returns the Markdown."""
  stats = dev.memory_stats() or {}
  info['peak_memory_bytes'] = peak = stats.get('peak_bytes_in_use')
  with open(FLAGS.out + '.json', 'w') as f:
    json.dump({'info': info, 'rows': rows}, f, indent=2)
  md = [f'Device: {info["device"]}; JAX {info["jax"]}; K={info["clients"]}, B={info["batch"]}, '
        f'S={info["size"]}, UNet base {info["base"]}, {info["levels"]} levels; peak device memory: '
        f'{"n/a on this backend" if peak is None else f"{peak / 2**30:.2f} GiB"}'
        + (f'; {info["anchor"]}' if 'anchor' in info else ''), '',
        '| measurement | value |', '|---|---|']
  md += [f'| {r["what"]} | {r["value"]:.{2 if r["unit"] in ("s", "min", "x") else 1}f} {r["unit"]} |'
         for r in rows]
  with open(FLAGS.out + '.md', 'w') as f:
    f.write('\n'.join(md) + '\n')
  return '\n'.join(md)


def round_rows(k, s, base, reps, precision, d, axis):
  """The full-round rows of one setting: seconds, protocol estimate, memory per device."""
  images = 8 if FLAGS.quick else FLAGS.images
  axis = engine.resolve_client_axis(axis)
  per_round, compile_s, n_train, memory = full_round(
      k, s, base, images, FLAGS.method, precision, d, reps, FLAGS.rounds, axis)
  setting = f'{precision}, {d} device(s), client_axis={axis}'
  what = (f'full round, {FLAGS.method}, {setting}, {n_train} train images'
          + ''.join(f', {item}' for item in FLAGS.set))
  return ([{'what': what, 'unit': 's', 'value': per_round},
           {'what': f'protocol estimate: compile {compile_s:.0f} s + {FLAGS.rounds} rounds, '
                    f'{setting}', 'unit': 'min',
            'value': (compile_s + FLAGS.rounds * per_round) / 60}]
          + [{'what': f'round memory per device (XLA analysis), {name}, {setting}', 'unit': 'MiB',
              'value': value / 2**20} for name, value in memory.items() if value is not None])


def device_counts(flag: str) -> list:
  """``--devices`` / ``--step_devices``: '1,2' -> [1, 2]; 'all' is every device."""
  return [int(d) for d in flag.replace('all', str(len(jax.devices()))).split(',')]


def main(argv):
  del argv
  k, b, s, base, reps = FLAGS.clients, FLAGS.batch, FLAGS.size, FLAGS.base, FLAGS.repeats
  if FLAGS.quick:
    k, b, s, base, reps = 2, 2, 16, 4, 2
    FLAGS.levels = 3
  cpu_devices = sharding.split_host_cpu(FLAGS.cpu_devices)   # before JAX starts
  dev = jax.devices()[0]
  info = {'device': f'{dev.platform}: {getattr(dev, "device_kind", "")}', 'jax': jax.__version__,
          'python': platform.python_version(), 'clients': k, 'batch': b, 'size': s, 'base': base,
          'levels': FLAGS.levels, 'cpu_devices': cpu_devices}
  rows = []
  parts = set(FLAGS.parts.split(','))
  convs = [engine.resolve_conv(c) for c in FLAGS.conv.split(',')]
  for conv in convs if 'step' in parts else ():
    for strategy in map(engine.resolve_client_axis, FLAGS.step_axis.split(',')):
      for d in device_counts(FLAGS.step_devices):
        for precision in ('fp32', 'bf16'):
          rate = train_step_rate(k, b, s, base, strategy, precision, reps, conv, d)
          on = '' if d == 1 else f', {d} devices'
          rows.append({'what': f'train step, client_axis={strategy}, {precision}, conv={conv}{on}',
                       'unit': 'images/s', 'value': rate})
          write(info, rows, dev)
  n = 8 if not FLAGS.quick else 4
  chunks = (1, 4, 8) if not FLAGS.quick else (2, 4)
  for conv in convs if 'fisher' in parts else ():
    for name, rate in fisher_rates(n, s, base, chunks, reps, conv).items():
      rows.append({'what': f'per-example Fisher, {name}, conv={conv} ({n} examples)',
                   'unit': 'examples/s', 'value': rate})
    write(info, rows, dev)
  if FLAGS.anchor:
    anchor, info['anchor'] = anchor_rows(k, b, s, base, n, reps, rows)
    rows += anchor
  for precision in FLAGS.precision.split(',') if 'round' in parts else ():
    for d in device_counts(FLAGS.devices):
      for axis in FLAGS.client_axis.split(','):
        rows += round_rows(k, s, base, reps, precision, d, axis)
        write(info, rows, dev)
  print(write(info, rows, dev))


if __name__ == '__main__':
  app.run(main)
