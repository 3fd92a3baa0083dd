import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pflresfim_jax import build
from pflresfim_jax.clients import engine
from fed_helpers import setup
from helpers import assert_tree_close, random_batch, sum_rtol, tiny_unet

pytestmark = pytest.mark.reference


def test_resolve():
  assert engine.resolve_client_axis('auto') == 'map'
  assert not engine.resolve_unroll('auto')
  assert engine.resolve_conv('auto', 'cpu') == 'canonical' and engine.resolve_conv('auto', 'gpu') == 'xla'
  assert engine.resolve_conv('xla', 'cpu') == 'xla'
  assert engine.resolve_fisher_conv('auto', 'canonical') == 'canonical'
  assert engine.resolve_fisher_conv('im2col', 'xla') == 'im2col'
  with pytest.raises(ValueError, match='fisher.conv'):
    engine.resolve_fisher_conv('fft', 'xla')
  with pytest.raises(ValueError, match='model.conv'):
    engine.resolve_conv('winograd')
  assert engine.resolve_unroll('false') is False and engine.resolve_unroll(True) is True
  with pytest.raises(ValueError, match='engine.unroll'):
    engine.resolve_unroll('sometimes')
  with pytest.raises(ValueError, match='client_axis'):
    engine.resolve_client_axis('pmap')


def test_epoch_order_is_a_permutation_of_real_examples():
  order = np.asarray(engine.epoch_order(jax.random.PRNGKey(0), 5, 8, 12))
  assert sorted(order[:5].tolist()) == [0, 1, 2, 3, 4] and order.shape == (12,)


def test_augment_keeps_image_and_label_aligned():
  x = jnp.arange(16.0).reshape(4, 4, 1) * jnp.ones((1, 1, 3))
  y = x[..., :1]
  for s in range(8):
    a, b = engine.augment(jax.random.PRNGKey(s), x, y, True, True)
    np.testing.assert_array_equal(a[..., :1], b)


def _train(data, key, epochs=2, batch=4):
  model, params, stats = tiny_unet()
  tx = engine.optimizer(5e-4)
  loss = engine.seg_loss(model)
  step = engine.train_step(loss, tx)
  run = jax.jit(lambda c, d, k: engine.local_train(step, c, None, d, k, 1e-2, epochs, batch,
                                                   flip=False, rot90=False))
  return run((params, stats, tx.init(params)), data, key), (params, stats)


def test_padding_never_changes_the_model():
  b = random_batch(8)
  real = {'image': b['image'][:4], 'label': b['label'][:4], 'count': jnp.int32(4)}
  # Same 4 examples padded to 8 with garbage: one step of 4 in both cases.
  padded = {'image': b['image'].at[4:].set(9.0), 'label': b['label'], 'count': jnp.int32(4)}
  ((p1, s1, _), l1), _ = _train(real, jax.random.PRNGKey(0), epochs=1)
  ((p2, s2, _), l2), _ = _train(padded, jax.random.PRNGKey(0), epochs=1)
  # One step on a batch of 4 vs 8 with a mask: BatchNorm and loss reduce over 4 x 16 x 16
  # values in another shape (tol). Adam's first step is +-lr whatever the gradient's size,
  # so parameters differ only where a gradient is at noise level: rtol 1e-4 (a leak of
  # the padding flips update signs: differences of 2 lr = 0.02).
  tol = sum_rtol(4 * 16 * 16)
  jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-6), p1, p2)
  assert_tree_close(s2, s1, rtol=tol, atol_rel=tol)
  np.testing.assert_allclose(l1, l2, rtol=tol)


def test_every_step_gets_its_own_key():
  # A step that records its batch's key: 3 epochs x 2 steps, all different (a loss
  # that draws, FedRDN's, sees fresh randomness every batch).
  def step(carry, aux, batch, mask, lr):
    seen, n = carry
    return (seen.at[n].set(batch['key']), n + 1), jnp.float32(0)
  data = {**random_batch(8, size=4), 'count': jnp.int32(8)}
  init = (jnp.zeros((6, 2), jnp.uint32), jnp.int32(0))
  (seen, n), _ = jax.jit(lambda d, k: engine.local_train(step, init, None, d, k, 0.1, 3, 4))(
      data, jax.random.PRNGKey(0))
  assert int(n) == 6 and len({tuple(k) for k in np.asarray(seen).tolist()}) == 6


def test_a_client_runs_only_its_own_steps():
  # 5 real examples of 12 slots, batches of 4: the compact loop takes ceil(5/4) = 2
  # steps an epoch, the unrolled one all 3 (the last discarded); each real example
  # is seen once an epoch either way.
  calls = []

  def step(carry, aux, batch, mask, lr):
    jax.debug.callback(lambda: calls.append(1))
    return carry + jnp.sum(mask), jnp.float32(0)
  data = {**random_batch(12, size=4), 'count': jnp.int32(5)}
  for unroll, steps in ((False, 2), (True, 3)):
    calls.clear()
    seen, _ = jax.jit(lambda d, k: engine.local_train(
        step, jnp.int32(0), None, d, k, 0.1, 2, 4, unroll=unroll))(data, jax.random.PRNGKey(0))
    jax.effects_barrier()
    assert len(calls) == 2 * steps and int(seen) == 2 * 5, (unroll, len(calls), int(seen))


def test_client_without_data_is_unchanged():
  b = random_batch(4)
  ((p, s, _), loss), (p0, s0) = _train({**b, 'count': jnp.int32(0)}, jax.random.PRNGKey(0))
  jax.tree.map(np.testing.assert_array_equal, p, p0)
  jax.tree.map(np.testing.assert_array_equal, s, s0)
  assert float(loss) == 0.0


def test_vmap_and_map_agree_and_round_compiles_once():
  # Adam turns float noise in near-zero gradients into +-lr steps, so the strategies are
  # compared at a tiny lr; BN statistics, losses, masks and metrics carry each client's data.
  results = {}
  for axis in ('vmap', 'map'):
    cfg, fed, _, data, bank = setup('pfl_resfim', lr=1e-6, **{'engine.client_axis': axis})
    init_fn, round_fn = build.compile_method(cfg, fed, 'pfl_resfim')   # what the trainer runs
    state = init_fn(jax.random.PRNGKey(0))
    for rnd in range(2):
      state, metrics = round_fn(state, data, bank, jax.random.PRNGKey(rnd), jnp.int32(rnd))
    assert round_fn._cache_size() == 1, 'the round function must not recompile after round 1'
    results[axis] = (state, metrics)
  (s_v, m_v), (s_m, m_m) = results['vmap'], results['map']
  # Two rounds at lr 1e-6: params move ~1e-5 and differ by less than that.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               s_v['params'], s_m['params'])
  # Statistics and losses reduce over a client's data (up to 40 x 16 x 16 values) in
  # grouped (vmap) vs plain (map) convolutions: 1e-3 / 1e-4 relative; Dice is a fraction
  # of pixels, where a pixel at the threshold could flip.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
               s_v['batch_stats'], s_m['batch_stats'])
  np.testing.assert_allclose(m_v['train_loss'], m_m['train_loss'], rtol=1e-4)
  np.testing.assert_allclose(m_v['val']['dice'], m_m['val']['dice'], atol=1e-4)
  agree = np.mean([np.mean(np.asarray(a) == np.asarray(b)) for a, b in
                   zip(jax.tree.leaves(s_v['local_mask']), jax.tree.leaves(s_m['local_mask']))])
  assert agree > 0.99


def test_fisher_chunk_auto_and_checked():
  assert engine.resolve_fisher_chunk(None, unroll=True) == 4
  assert engine.resolve_fisher_chunk(None, unroll=False) == 1
  assert engine.resolve_fisher_chunk(8, unroll=True) == 8
  assert engine.resolve_fisher_chunk(None, unroll=False, grads='layers') == 8
  assert engine.resolve_fisher_chunk(2, unroll=False, grads='layers') == 2
  with pytest.raises(ValueError, match='fisher.chunk_size'):
    engine.resolve_fisher_chunk(0, unroll=False)


def _adam_l2_reference(p, grad_fn, lrs, wd, b1=0.9, b2=0.999, eps=1e-8):
  """torch's Adam(weight_decay=wd) written out in float64, one rate per step."""
  m = np.zeros_like(p)
  v = np.zeros_like(p)
  for t, lr in enumerate(lrs, start=1):
    g = grad_fn(p) + wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
  return p


def test_train_step_is_adam_with_l2_and_the_rate_it_is_given():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(5, 3)), rng.normal(size=5)
  w0 = {'a': rng.normal(size=3), 'b': rng.normal(size=2)}
  target = rng.normal(size=2)

  def loss_fn(params, stats, batch, mask, aux):
    fit = jnp.sum((batch['x'] @ params['a'] - batch['y']) ** 2)
    return fit + jnp.sum((params['b'] - target) ** 2), stats

  lrs = [1e-2, 1e-2, 5e-3, 0.0, 2.5e-3]   # the round schedule's rate, changed between steps
  tx = engine.optimizer(5e-4)
  step = jax.jit(engine.train_step(loss_fn, tx))
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), w0)
  carry = (params, {}, tx.init(params))
  batch = {'x': jnp.asarray(x, jnp.float32), 'y': jnp.asarray(y, jnp.float32)}
  for lr in lrs:
    carry, _ = step(carry, None, batch, None, jnp.float32(lr))
  want_a = _adam_l2_reference(w0['a'], lambda a: 2 * x.T @ (x @ a - y), lrs, 5e-4)
  want_b = _adam_l2_reference(w0['b'], lambda b: 2 * (b - target), lrs, 5e-4)
  # Five float32 Adam steps of size ~lr: their rounding (a few eps of each step and of
  # the parameters) against float64.
  np.testing.assert_allclose(carry[0]['a'], want_a, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(carry[0]['b'], want_b, rtol=1e-5, atol=1e-6)

  # Frozen by path: 'b' never moves and carries no Adam moments; 'a' moves as before.
  frozen_tx = engine.optimizer(5e-4, trainable=lambda path: 'a' in str(path))
  step = jax.jit(engine.train_step(loss_fn, frozen_tx))
  carry = (params, {}, frozen_tx.init(params))
  for lr in lrs:
    carry, _ = step(carry, None, batch, None, jnp.float32(lr))
  np.testing.assert_array_equal(carry[0]['b'], params['b'])
  np.testing.assert_allclose(carry[0]['a'], want_a, rtol=1e-5, atol=1e-6)
  moments = [x.shape for x in jax.tree.leaves(carry[2]) if getattr(x, 'ndim', 0) > 0]
  assert (2,) not in moments and (3,) in moments


def test_round_schedule_halves_every_quarter_or_stays():
  cfg = build.resolve(base_with(lr=1e-3, lr_schedule='step'))
  sched = engine.round_schedule(cfg, 20)
  got = [float(sched(jnp.int32(r))) for r in range(20)]
  assert got == [np.float32(1e-3) * 0.5 ** (r // 5) for r in range(20)]   # exact: powers of 2
  const = engine.round_schedule(build.resolve(base_with(lr=1e-3, lr_schedule='constant')), 20)
  assert float(const(jnp.int32(13))) == 1e-3
  with pytest.raises(ValueError, match='config.lr_schedule'):
    engine.round_schedule(base_with(lr_schedule='cosine'), 20)


def base_with(**fields):
  from pflresfim_jax import config as config_lib
  c = config_lib.base_config()
  c.update(fields)
  return c
