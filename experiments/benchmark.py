"""Throughput benchmark: ``python experiments/benchmark.py [--quick] [--out=bench.json]``.

Measures on whatever backend JAX finds:
* training images/s of one local step for K clients x batch B at size S, for each
  ``engine.client_axis`` strategy and precision;
* per-example Fisher examples/s (``fisher.diagonal``) for several chunk sizes, against
  a Python loop of batch-1 jitted gradients.
Writes JSON and a Markdown table with the device, versions and settings. ``--quick``
uses a tiny model and images (a CI smoke test; its numbers mean little).
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

from pflresfim_jax import fisher, losses, models  # noqa: E402
from pflresfim_jax.clients import engine  # noqa: E402

flags.DEFINE_bool('quick', False, 'tiny sizes (CPU smoke test)')
flags.DEFINE_integer('clients', 6, 'K')
flags.DEFINE_integer('batch', 8, 'B per client')
flags.DEFINE_integer('size', 256, 'S')
flags.DEFINE_integer('base', 16, 'UNet base width')
flags.DEFINE_integer('repeats', 5, 'timed repetitions')
flags.DEFINE_string('out', 'benchmark', 'output path stem (.json and .md)')
FLAGS = flags.FLAGS


def timed(fn, *args, repeats):
  jax.block_until_ready(fn(*args))  # compile + warm up
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats


def train_step_rate(k, b, s, base, strategy, precision, repeats):
  model = models.UNet2D(base=base, dtype=jnp.bfloat16 if precision == 'bf16' else jnp.float32)
  params, stats = models.init(model, jax.random.PRNGKey(0), (s, s, 3))
  tx = engine.optimizer(5e-4)
  step = engine.sgd_step(lambda p, st, bt, m, a: engine.seg_loss(model)(p, st, bt, m), tx)
  stack = lambda t: jax.tree.map(lambda x: jnp.broadcast_to(x, (k, *x.shape)), t)
  carry = stack((params, stats, tx.init(params)))
  x = jax.random.uniform(jax.random.PRNGKey(1), (k, b, s, s, 3))
  y = (x[..., :1] > 0.5).astype(jnp.float32)
  fn = jax.jit(lambda c, x, y: engine.map_clients(
      lambda cc, xx, yy: step(cc, None, {'image': xx, 'label': yy}, None, 1e-3), strategy, c, x, y))
  return k * b / timed(fn, carry, x, y, repeats=repeats)


def fisher_rates(n, s, base, chunks, repeats):
  model = models.UNet2D(base=base)
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


def main(argv):
  del argv
  k, b, s, base, reps = FLAGS.clients, FLAGS.batch, FLAGS.size, FLAGS.base, FLAGS.repeats
  if FLAGS.quick:
    k, b, s, base, reps = 2, 2, 32, 4, 2
  dev = jax.devices()[0]
  info = {'device': f'{dev.platform}: {getattr(dev, "device_kind", "")}', 'jax': jax.__version__,
          'python': platform.python_version(), 'clients': k, 'batch': b, 'size': s, 'base': base}
  rows = []
  for strategy in ('vmap', 'map'):
    for precision in ('fp32', 'bf16'):
      rate = train_step_rate(k, b, s, base, strategy, precision, reps)
      rows.append({'what': f'train step, client_axis={strategy}, {precision}', 'unit': 'images/s', 'value': rate})
  n = 8 if not FLAGS.quick else 4
  for name, rate in fisher_rates(n, s, base, (1, 4, 8) if not FLAGS.quick else (2, 4), reps).items():
    rows.append({'what': f'per-example Fisher, {name} ({n} examples)', 'unit': 'examples/s', 'value': rate})
  result = {'info': info, 'rows': rows}
  with open(FLAGS.out + '.json', 'w') as f:
    json.dump(result, f, indent=2)
  md = [f'Device: {info["device"]}; JAX {info["jax"]}; K={k}, B={b}, S={s}, UNet base {base}', '',
        '| measurement | value |', '|---|---|']
  md += [f'| {r["what"]} | {r["value"]:.1f} {r["unit"]} |' for r in rows]
  with open(FLAGS.out + '.md', 'w') as f:
    f.write('\n'.join(md) + '\n')
  print('\n'.join(md))


if __name__ == '__main__':
  app.run(main)
