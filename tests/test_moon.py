"""MOON: the model-contrastive term against numpy, and what the client keeps as its previous model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pflresfim_jax.clients import engine
from pflresfim_jax.methods import moon
from fed_helpers import setup
from helpers import assert_tree_close, sum_rtol
from test_methods import one_round


def np_contrastive(z, zg, zp, t):
  """client_moon's con_loss per image, float64: torch CosineSimilarity, then -log softmax."""
  flat = lambda x: np.asarray(x, np.float64).reshape(len(x), -1)
  z, zg, zp = flat(z), flat(zg), flat(zp)
  cos = lambda a, b: (a * b).sum(1) / (np.maximum(np.linalg.norm(a, axis=1), 1e-8)
                                       * np.maximum(np.linalg.norm(b, axis=1), 1e-8))
  pos, neg = np.exp(cos(z, zg) / t), np.exp(cos(z, zp) / t)
  return -np.log(pos / (pos + neg))


@pytest.mark.reference
def test_contrastive_matches_the_reference_formula():
  rng = np.random.default_rng(0)
  z, zg, zp = (rng.normal(size=(5, 4, 4, 6)).astype(np.float32) for _ in range(3))
  zp[0] = z[0]                       # the previous model's features equal: a large neg term
  zg[1] = -z[1]                      # opposite to the global one
  got = moon.contrastive(jnp.asarray(z), jnp.asarray(zg), jnp.asarray(zp), 0.5)
  # Cosines are sums of 96 products; /t and exp amplify their rounding a few times.
  np.testing.assert_allclose(got, np_contrastive(z, zg, zp, 0.5), rtol=sum_rtol(96) * 8)


def batch_and_state(method='moon', **overrides):
  cfg, fed, algo, data, bank = setup(method, **overrides)
  state = jax.jit(algo.init)(jax.random.PRNGKey(0))
  one = lambda t: jax.tree.map(lambda x: x[0], t)
  train = data['train']
  batch = {'image': train['image'][0, :4], 'label': train['label'][0, :4]}
  return cfg, algo, one(state), batch


def test_loss_is_dice_bce_plus_mu_times_the_contrastive_term():
  cfg, algo, state, batch = batch_and_state()
  method, model = algo.method, algo.method.model
  mask = jnp.ones(4, bool)
  # A 'previous' model that differs from the global one (else the term is log 2).
  prev = jax.tree.map(lambda x: x * 1.1 + 0.01, {'params': state['params'],
                                                 'batch_stats': state['batch_stats']})
  aux = {'global': {'params': state['params'], 'batch_stats': state['batch_stats']}, 'prev': prev}
  got, got_stats = jax.jit(method.loss)(state['params'], state['batch_stats'], batch, mask, aux)
  seg, seg_stats = engine.seg_loss(model)(state['params'], state['batch_stats'], batch, mask)
  feats = lambda v, train: model.apply(v, batch['image'], train=train, features=True,
                                       mutable=['batch_stats'] if train else False)
  (_, z), _ = feats({'params': state['params'], 'batch_stats': state['batch_stats']}, True)
  _, zg = feats(aux['global'], False)
  _, zp = feats(prev, False)
  con = np_contrastive(z, zg, zp, cfg.moon.temperature).mean()
  assert abs(con - np.log(2)) > 1e-3          # the term is not its round-0 constant here
  want = float(seg) + cfg.moon.mu * con
  np.testing.assert_allclose(float(got), want, rtol=sum_rtol(4 * 16 * 16 * 4))
  assert_tree_close(got_stats, seg_stats, rtol=1e-6, atol_rel=1e-6)   # one train-mode pass


def test_round_zero_term_is_log2_and_adds_no_gradient():
  """Previous model = received model = the initialisation: z_g = z_p, so l_con = log 2
  whatever z is, and its gradient is zero."""
  cfg, algo, state, batch = batch_and_state(**{'moon.mu': 1.0})
  method = algo.method
  aux = method.loss_aux(jax.tree.map(lambda x: x[None], state))
  aux = jax.tree.map(lambda x: x[0], aux)
  mask = jnp.ones(4, bool)
  grad = lambda f: jax.jit(jax.grad(lambda p: f(p, state['batch_stats'], batch, mask, aux)[0]))
  value, _ = method.loss(state['params'], state['batch_stats'], batch, mask, aux)
  seg, _ = engine.seg_loss(method.model)(state['params'], state['batch_stats'], batch, mask)
  np.testing.assert_allclose(float(value), float(seg) + np.log(2), rtol=1e-6)
  g_moon, g_seg = grad(method.loss)(state['params']), grad(engine.seg_loss(method.model))(state['params'])
  # Same program but the zero term: the gradients agree to float noise, measured against
  # the model's largest gradient (conv biases before BatchNorm have only noise, ~1e-9).
  scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_seg))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale),
               g_moon, g_seg)


def test_previous_model_is_the_trained_one_before_aggregation():
  _, trained, after, _, _ = one_round('moon')
  prev = after['personal']['prev']
  jax.tree.map(np.testing.assert_array_equal, prev['params'], trained['params'])
  jax.tree.map(np.testing.assert_array_equal, prev['batch_stats'], trained['batch_stats'])
  # The server averaged the model (FedAvg, statistics included); the previous one stays each client's.
  head = np.asarray(after['params']['head']['kernel'])
  assert np.allclose(head, head[:1]) and not np.allclose(prev['params']['head']['kernel'],
                                                          prev['params']['head']['kernel'][:1])
