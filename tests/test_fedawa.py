"""FedAWA's server against a numpy transcription of FL-MedSegBench's 'fedawa' branch, two rounds."""
import jax
import jax.numpy as jnp
import numpy as np

from pflresfim_jax.methods import fedawa
from helpers import flat64 as flat
from fed_helpers import start



def np_objective(t, thetas, g):
  """reg_loss + sim_loss of the reference for logits ``t`` (float64)."""
  p = np.exp(t - t.max())
  p /= p.sum()
  cos = thetas @ g / np.maximum(np.linalg.norm(thetas, axis=1) * np.linalg.norm(g), 1e-8)
  delta = thetas - g
  return np.sum(p * (1 - cos)) + np.sum(p * np.linalg.norm(delta - p @ delta, axis=1))


def np_fedawa_step(t, thetas, g, lr=1e-3, eps=1e-8):
  """(p used to aggregate, logits after one step of a fresh Adam): central differences."""
  grad = np.array([(np_objective(t + h, thetas, g) - np_objective(t - h, thetas, g)) / 2e-6
                   for h in np.eye(len(t)) * 1e-6])
  # Fresh Adam, first step: m_hat = grad, v_hat = grad^2 (bias-corrected), betas cancel.
  p = np.exp(t - t.max())
  return p / p.sum(), t - lr * grad / (np.abs(grad) + eps)


def test_two_rounds_learn_the_weights_as_the_reference():
  cfg, fed, algo, data, bank, state, weights, t = start('fedawa')   # round 0: T = size weights
  k = fed.num_clients
  g = flat(jax.tree.map(lambda x: x[0], state['params']))
  client, aggregate = jax.jit(algo.client), jax.jit(algo.aggregate)
  for rnd in range(2):
    keys = [jax.random.split(jax.random.PRNGKey(10 * rnd + i), k) for i in (1, 2)]
    trained, agg_mask, _ = client(state, data['train'], bank, *keys, jnp.int32(rnd), jnp.arange(k))
    thetas = np.stack([flat(jax.tree.map(lambda x, i=i: x[i], trained['params'])) for i in range(k)])
    p, t = np_fedawa_step(t, thetas, g)
    state, _ = aggregate(trained, agg_mask, weights, jnp.int32(rnd))
    np.testing.assert_allclose(state['server']['logits'][0], t, rtol=1e-6, atol=1e-7)
    for part in ('params', 'batch_stats'):
      want = p @ np.stack([flat(jax.tree.map(lambda x, i=i: x[i], trained[part])) for i in range(k)])
      for i in range(k):
        np.testing.assert_allclose(flat(jax.tree.map(lambda x, i=i: x[i], state[part])), want,
                                   rtol=1e-5, atol=1e-6 * np.abs(want).max())
    g = p @ thetas
  assert not np.allclose(p, p[0])          # not plain uniform weights


def test_absent_clients_get_no_weight():
  rng = np.random.default_rng(0)
  thetas = jnp.asarray(rng.normal(size=(3, 10)), jnp.float32)
  g = jnp.asarray(rng.normal(size=10), jnp.float32)
  present = jnp.array([True, False, True])
  grad = jax.grad(fedawa.objective)(jnp.zeros(3), thetas, g, present)
  assert float(grad[1]) == 0.0
  keep = np.asarray([0, 2])
  want = np_objective(np.zeros(2), np.asarray(thetas, np.float64)[keep], np.asarray(g, np.float64))
  np.testing.assert_allclose(float(fedawa.objective(jnp.zeros(3), thetas, g, present)), want, rtol=1e-5)
