"""FedDyn against a numpy transcription of FL-MedSegBench's client_feddyn and 'feddyn' server."""
import jax
import jax.numpy as jnp
import numpy as np

from pflresfim_jax.clients import engine
from fed_helpers import setup, start
from helpers import flat64 as flat, sum_rtol



def test_client_loss_and_its_gradient_at_the_received_model():
  cfg, fed, algo, data, bank = setup('feddyn', **{'feddyn.mu': 0.5})
  state = jax.tree.map(lambda x: x[0], jax.jit(algo.init)(jax.random.PRNGKey(0)))
  method, params, stats = algo.method, state['params'], state['batch_stats']
  batch = {'image': data['train']['image'][0, :4], 'label': data['train']['label'][0, :4]}
  mask = jnp.ones(4, bool)
  rng = np.random.default_rng(0)
  old = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32) * 1e-3, params)
  g = jax.tree.map(lambda x: x + 0.01, params)
  seg, _ = engine.seg_loss(method.model)(params, stats, batch, mask)
  got, _ = method.loss(params, stats, batch, mask, {'global': g, 'old_grad': old})
  v, gv = flat(params), flat(g)
  want = float(seg) + 0.25 * np.linalg.norm(v - gv) - v @ flat(old)   # mu/2 ||v - g||_2 - <v, old>
  np.testing.assert_allclose(float(got), want, rtol=sum_rtol(v.size))
  # At theta = g (every round's first step) the unsquared norm has gradient 0, as torch's.
  grad = jax.grad(lambda p: method.loss(p, stats, batch, mask,
                                        {'global': params, 'old_grad': old})[0])(params)
  seg_grad = jax.grad(lambda p: engine.seg_loss(method.model)(p, stats, batch, mask)[0])(params)
  np.testing.assert_allclose(flat(grad), flat(seg_grad) - flat(old), rtol=1e-4,
                             atol=1e-5 * np.abs(flat(seg_grad)).max())


def test_two_rounds_against_the_reference_server_and_client_update():
  cfg, fed, algo, data, bank, state, weights, p = start('feddyn')
  mu, k = cfg.feddyn.mu, fed.num_clients
  g = flat(jax.tree.map(lambda x: x[0], state['params']))
  h = np.zeros_like(g)
  old = [np.zeros_like(g) for _ in range(k)]
  client, aggregate = jax.jit(algo.client), jax.jit(algo.aggregate)
  for rnd in range(2):
    keys = [jax.random.split(jax.random.PRNGKey(10 * rnd + i), k) for i in (1, 2)]
    trained, agg_mask, _ = client(state, data['train'], bank, *keys, jnp.int32(rnd), jnp.arange(k))
    thetas = [flat(jax.tree.map(lambda x, i=i: x[i], trained['params'])) for i in range(k)]
    for i in range(k):        # client i's old_grad after its training
      old[i] = old[i] - mu * (thetas[i] - g)
      np.testing.assert_allclose(flat(jax.tree.map(lambda x, i=i: x[i], trained['personal'])), old[i],
                                 rtol=1e-5, atol=1e-7)
    state, _ = aggregate(trained, agg_mask, weights, jnp.int32(rnd))
    h = h - mu * sum(p[i] * (thetas[i] - g) for i in range(k))
    g = sum(p[i] * thetas[i] for i in range(k)) - h / mu
    for i in range(k):
      # h / mu undoes a factor mu: float32 error of the mean over 3 clients, times 1/mu
      # relative to the parameters' scale.
      np.testing.assert_allclose(flat(jax.tree.map(lambda x, i=i: x[i], state['params'])), g,
                                 rtol=1e-5, atol=1e-5 * np.abs(g).max())
      # BatchNorm statistics: client 0's upload, as the reference's deepcopy(uploaded_models[0]).
      jax.tree.map(lambda s, t, i=i: np.testing.assert_array_equal(s[i], t[0]),
                   state['batch_stats'], trained['batch_stats'])
