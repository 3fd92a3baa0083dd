"""FedNova's server against a numpy transcription of FL-MedSegBench's 'fednova' branch,
in the simulator and in a deployed server, over two rounds (its state: the last global)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pflresfim_jax import deploy, methods
from pflresfim_jax.methods import fednova
from fed_helpers import setup
from helpers import sum_rtol


def np_fednova(g_old, thetas, size_weights, client_steps):
  """server_funct.py 'fednova', written out per client over the selected ones (weight > 0)."""
  sel = [j for j, w in enumerate(size_weights) if w > 0]
  freqs = {j: size_weights[j] / sum(size_weights[i] for i in sel) for j in sel}
  tao_eff = sum(freqs[j] * client_steps[j] for j in sel)
  correct = sum(freqs[j] / client_steps[j] * tao_eff for j in sel)
  new = (1.0 - correct) * np.asarray(g_old, np.float64)
  for j in sel:
    new = new + freqs[j] / client_steps[j] * tao_eff * np.asarray(thetas[j], np.float64)
  return new


@pytest.mark.reference
def test_normalised_mean_is_the_reference_rule():
  rng = np.random.default_rng(0)
  k = 4
  g = rng.normal(size=(3, 5)).astype(np.float32)
  thetas = (g + rng.normal(scale=0.1, size=(k, 3, 5))).astype(np.float32)
  weights = np.array([2.0, 0.0, 5.0, 3.0], np.float32)      # client 1 absent
  steps = np.array([2.0, 0.0, 5.0, 1.0], np.float32)
  a = fednova.coefficients(jnp.asarray(weights), jnp.asarray(steps))
  got = fednova.normalised_mean(jnp.asarray(thetas), jnp.broadcast_to(g, thetas.shape), a)
  want = np_fednova(g, thetas, weights, steps)
  for j in range(k):   # every slot gets the new global model
    np.testing.assert_allclose(got[j], want, rtol=sum_rtol(k + 1), atol=sum_rtol(k + 1))
  # Steps proportional to the weights: the unweighted mean, pushed past g by sum a >= 1.
  a = np.asarray(fednova.coefficients(jnp.asarray(steps), jnp.asarray(steps)))
  np.testing.assert_allclose(a[[0, 2, 3]], a[0], rtol=1e-6)
  assert float(jnp.sum(a)) >= 1.0 and float(a[1]) == 0.0


def _round(algo, state, data, bank, seed):
  k = state['params']['head']['kernel'].shape[0]
  keys = [jax.random.split(jax.random.PRNGKey(seed + i), k) for i in (1, 2)]
  trained, agg_mask, _ = jax.jit(algo.client)(state, data['train'], bank, *keys,
                                              jnp.int32(0), jnp.arange(k))
  return trained, agg_mask


def test_two_rounds_use_the_last_global_model_in_simulation_and_deployment():
  cfg, fed, algo, data, bank = setup('fednova')
  counts = np.asarray(data['train']['count'])
  steps = np.ceil(counts / cfg.batch_size)          # batches per epoch (len(train_loader))
  weights = jnp.asarray(steps, jnp.float32)         # aggregate_weights='batches'
  server = deploy.Server(cfg, 'fednova', fed.num_clients, fed.image_shape, seed=0)
  state = jax.jit(algo.init)(methods.run_keys(0)[0])   # the initial model the server starts from
  g_old = jax.tree.map(lambda x: np.asarray(x)[0], state['params'])
  for rnd in range(2):
    trained, agg_mask = _round(algo, state, data, bank, 10 * rnd)
    state, _ = jax.jit(algo.aggregate)(trained, agg_mask, weights, jnp.int32(rnd))
    uploads = {}
    for i in range(fed.num_clients):
      mine = lambda t: jax.tree.map(lambda x: np.asarray(x)[i], t)
      up = deploy.pack(mine(trained['params']), algo.contract.sent(mine(agg_mask)), 'params')
      up.update(deploy.pack_mask(mine(agg_mask), 'agg_mask'))
      up.update(deploy.pack_mask(mine(trained['local_mask']), 'local_mask'))
      up.update(deploy.prefixed('batch_stats', deploy.flatten(mine(trained['batch_stats']))))
      up.update({'weight': np.float32(steps[i]), 'train_loss': np.float32(0.0)})
      uploads[i] = up
    sent_back, _ = server.aggregate(rnd, uploads)
    thetas = [jax.tree.map(lambda x: np.asarray(x)[i], trained['params']) for i in range(len(steps))]
    want = jax.tree.map(lambda g, *t: np_fednova(g, t, steps, steps), g_old, *thetas)
    for i in range(fed.num_clients):
      deployed, _ = deploy.unpack(server.params, sent_back[i], 'params')
      for a, b, c in zip(jax.tree.leaves(want), jax.tree.leaves(state['params']),
                         jax.tree.leaves(deployed)):
        tol = dict(rtol=1e-5, atol=1e-5 * float(np.abs(a).max()))   # 3 clients + g, float32
        np.testing.assert_allclose(np.asarray(b)[i], a, **tol)
        np.testing.assert_allclose(c, a, **tol)
    jax.tree.map(lambda s, p: np.testing.assert_array_equal(s, p), state['server']['params'],
                 state['params'])
    g_old = jax.tree.map(lambda x: np.asarray(x)[0], state['params'])
