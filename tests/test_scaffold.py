"""SCAFFOLD as FL-MedSegBench runs it: SGD on g - c_i, the control update, the unweighted mean."""
import jax
import jax.numpy as jnp
import numpy as np

from pflresfim_jax.clients import engine
from helpers import flat64 as flat
from fed_helpers import setup



def test_one_step_is_sgd_on_the_corrected_gradient():
  cfg, fed, algo, data, bank = setup('scaffold')
  state = jax.tree.map(lambda x: x[0], jax.jit(algo.init)(jax.random.PRNGKey(0)))
  method, params, stats = algo.method, state['params'], state['batch_stats']
  batch = {'image': data['train']['image'][0, :4], 'label': data['train']['label'][0, :4]}
  mask = jnp.ones(4, bool)
  rng = np.random.default_rng(0)
  control = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
  step = jax.jit(engine.train_step(method.loss, method.tx))
  (new, _, _), loss = step((params, stats, method.tx.init(params)), control, batch, mask, 0.01)
  seg = engine.seg_loss(method.model)
  value, _ = seg(params, stats, batch, mask)
  grad = jax.grad(lambda p: seg(p, stats, batch, mask)[0])(params)
  # ScaffoldOptimizer: p - lr * (grad + c - c_i), c = 0, no momentum, no weight decay.
  want = flat(params) - 0.01 * (flat(grad) - flat(control))
  np.testing.assert_allclose(flat(new), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(loss), float(value), rtol=1e-6)   # the reported loss is the criterion's


def test_round_updates_controls_and_averages_unweighted():
  cfg, fed, algo, data, bank = setup('scaffold')
  k = fed.num_clients
  state0 = jax.jit(algo.init)(jax.random.PRNGKey(0))
  keys = [jax.random.split(jax.random.PRNGKey(i), k) for i in (1, 2)]
  trained, agg_mask, _ = jax.jit(algo.client)(state0, data['train'], bank, *keys, jnp.int32(0),
                                              jnp.arange(k))
  lr = float(algo.method.learning_rate(jnp.int32(0)))
  counts = np.asarray(data['train']['count'])
  for i in range(k):
    steps = cfg.local_epochs * np.ceil(counts[i] / cfg.batch_size)      # E * len(train_loader)
    x = flat(jax.tree.map(lambda t: t[i], state0['params']))
    y = flat(jax.tree.map(lambda t: t[i], trained['params']))
    got = flat(jax.tree.map(lambda t: t[i], trained['personal']['control']))
    np.testing.assert_allclose(got, (x - y) / (steps * lr), rtol=1e-5,
                               atol=1e-5 * np.abs(got).max())
  weights = jnp.asarray(counts, jnp.float32)            # unequal: must be ignored
  after, _ = jax.jit(algo.aggregate)(trained, agg_mask, weights, jnp.int32(0))
  for part in ('params', 'batch_stats'):
    mean = np.mean([flat(jax.tree.map(lambda t, i=i: t[i], trained[part])) for i in range(k)], 0)
    for i in range(k):
      np.testing.assert_allclose(flat(jax.tree.map(lambda t, i=i: t[i], after[part])), mean,
                                 rtol=1e-5, atol=1e-6 * np.abs(mean).max())
