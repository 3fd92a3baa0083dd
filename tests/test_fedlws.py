"""FedLWS's server against a numpy transcription of FL-MedSegBench's 'fedlws' rule, two rounds."""
import jax
import jax.numpy as jnp
import numpy as np

from pflresfim_jax.methods import fedlws
from fed_helpers import start


def np_fedlws_layer(thetas, g, p, beta=0.03, min_tau=0.01, max_tau=0.05):
  """One layer: thetas [K, N], g [N], p [K] (float64), the reference's loop body."""
  cur = p @ thetas
  grad = np.linalg.norm(cur - g)
  layer_grad = thetas - g
  global_grad = layer_grad.mean(0)
  tau = np.clip(beta * np.mean([np.linalg.norm(d - global_grad) for d in layer_grad]),
                min_tau, max_tau)
  gamma = np.linalg.norm(g) / (np.linalg.norm(g) + tau * grad)
  return cur * gamma


def test_layers_are_modules():
  params = {'enc1_0': {'conv': {'bias': 1, 'kernel': 2}, 'bn': {'bias': 3, 'scale': 4}},
            'head': {'bias': 5, 'kernel': 6}}
  assert sorted(len(v) for v in fedlws.layers(params).values()) == [2, 2, 2]


def test_two_rounds_against_the_reference():
  cfg, fed, algo, data, bank, state, weights, p = start('fedlws')
  k = fed.num_clients
  paths = lambda tree: {tuple(str(x) for x in path): np.asarray(v, np.float64)
                        for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  g = paths(jax.tree.map(lambda x: x[0], state['params']))
  client, aggregate = jax.jit(algo.client), jax.jit(algo.aggregate)
  gammas = []
  for rnd in range(2):
    keys = [jax.random.split(jax.random.PRNGKey(10 * rnd + i), k) for i in (1, 2)]
    trained, agg_mask, _ = client(state, data['train'], bank, *keys, jnp.int32(rnd), jnp.arange(k))
    state, _ = aggregate(trained, agg_mask, weights, jnp.int32(rnd))
    theta, got = paths(trained['params']), paths(state['params'])
    modules = sorted({key[:-1] for key in theta})
    new_g = {}
    for module in modules:
      keys_ = sorted(key for key in theta if key[:-1] == module)
      t = np.concatenate([theta[key].reshape(k, -1) for key in keys_], axis=1)
      last = np.concatenate([g[key].ravel() for key in keys_])
      want = np_fedlws_layer(t, last, p)
      have = np.concatenate([got[key].reshape(k, -1) for key in keys_], axis=1)
      for i in range(k):
        np.testing.assert_allclose(have[i], want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
      gammas.append(np.linalg.norm(want) / max(np.linalg.norm(p @ t), 1e-30))
      offset = 0
      for key in keys_:
        size = g[key].size
        new_g[key] = want[offset:offset + size].reshape(g[key].shape)
        offset += size
    g = new_g
    for s_got, s_tr in zip(jax.tree.leaves(state['batch_stats']), jax.tree.leaves(trained['batch_stats'])):
      # BatchNorm statistics [K, C]: the weighted mean, never scaled.
      np.testing.assert_allclose(np.asarray(s_got)[0], p @ np.asarray(s_tr, np.float64),
                                 rtol=1e-5, atol=1e-6)
  assert min(gammas) < 1.0 - 1e-6     # some layer was shrunk
