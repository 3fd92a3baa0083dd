"""FedRDN against numpy transcriptions of FL-MedSegBench's rules (nodes.py
compute_dataset_statistics, utils.py FedRDNTransform, validate_seg)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pflresfim_jax.clients import engine
from pflresfim_jax.methods import fedrdn
from fed_helpers import leaves_equal_across_clients, setup
from helpers import sum_rtol


def np_stats(images):
  """Pooled per-channel mean and population std over every pixel (float64)."""
  x = np.asarray(images, np.float64).reshape(-1, images.shape[-1])
  return x.mean(0), x.std(0)


@pytest.mark.reference
def test_channel_stats_pool_every_pixel_and_ignore_padding():
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(6, 8, 8, 3)).astype(np.float32)
  padded = np.concatenate([images, np.full((3, 8, 8, 3), 7.0, np.float32)])
  got = jax.jit(fedrdn.channel_stats)(jnp.asarray(padded), 6)
  mean, std = np_stats(images)
  tol = sum_rtol(images[..., 0].size)
  np.testing.assert_allclose(got['mean'], mean, rtol=tol)
  np.testing.assert_allclose(got['std'], std, rtol=tol)
  entries = fedrdn.bank_entries(images)
  assert entries['channel_mean'].shape == entries['channel_std'].shape == (1, 3)
  np.testing.assert_allclose(entries['channel_std'][0], std, rtol=tol)


@pytest.mark.reference
def test_the_bank_holds_every_clients_statistics():
  _, fed, _, _, bank = setup('fedrdn')
  assert bank['channel_mean'].shape == (fed.num_clients, fed.image_shape[-1])
  for k in range(fed.num_clients):
    images, _ = fed.train.client(k)
    mean, std = np_stats(images)
    tol = sum_rtol(images[..., 0].size)
    np.testing.assert_allclose(bank['channel_mean'][k], mean, rtol=tol)
    np.testing.assert_allclose(bank['channel_std'][k], std, rtol=tol)


@pytest.mark.reference
def test_each_batch_takes_one_clients_statistics_uniformly_own_included():
  _, fed, algo, data, _ = setup('fedrdn')
  method = algo.method
  state = jax.jit(algo.init)(jax.random.PRNGKey(0))
  params, stats = (jax.tree.map(lambda x: x[0], state[n]) for n in ('params', 'batch_stats'))
  # Three clients' statistics far apart, so each gives a clearly different loss.
  aux = {'mean': jnp.asarray([[0.0] * 3, [0.4] * 3, [-1.0] * 3]),
         'std': jnp.asarray([[1.0] * 3, [0.1] * 3, [2.0] * 3])}
  x = np.asarray(data['train']['image'][0, :4])
  batch = {'image': jnp.asarray(x), 'label': data['train']['label'][0, :4]}
  mask = jnp.ones(4, bool)
  seg = engine.seg_loss(method.model)
  want = []
  for j in range(3):   # the reference transform: (x - mean_j) / (std_j + 1e-8), numpy
    m, s = np.asarray(aux['mean'][j]), np.asarray(aux['std'][j])
    image = jnp.asarray(((x - m) / (s + 1e-8)).astype(np.float32))
    want.append(float(seg(params, stats, {**batch, 'image': image}, mask, None)[0]))
  assert min(abs(a - b) for i, a in enumerate(want) for b in want[i + 1:]) > 1e-3
  keys = jax.random.split(jax.random.PRNGKey(1), 150)
  got = jax.jit(jax.vmap(lambda k: method.loss(params, stats, {**batch, 'key': k}, mask, aux)[0]))(keys)
  drawn = []
  for g in np.asarray(got):
    err = [abs(g - w) / abs(w) for w in want]
    assert min(err) < 1e-4, (g, want)
    drawn.append(int(np.argmin(err)))
  counts = np.bincount(drawn, minlength=3)
  assert counts.min() >= 30, counts      # 50 expected each; 30 is 4 sd below


def test_a_round_normalises_with_own_statistics_and_averages_like_fedavg():
  _, fed, algo, data, bank = setup('fedrdn')
  k = fed.num_clients
  state = jax.jit(algo.init)(jax.random.PRNGKey(0))
  np.testing.assert_array_equal(state['personal']['std'], 1.0)    # identity before round 0
  keys = [jax.random.split(jax.random.PRNGKey(i), k) for i in (1, 2)]
  trained, agg_mask, _ = jax.jit(algo.client)(state, data['train'], bank, *keys, jnp.int32(0),
                                              jnp.arange(k))
  assert set(trained) == set(state)                   # the inbox does not outlive the round
  for i in range(k):
    images, _ = fed.train.client(i)
    mean, std = np_stats(images)
    np.testing.assert_allclose(trained['personal']['mean'][i], mean, rtol=sum_rtol(images[..., 0].size))
    np.testing.assert_allclose(trained['personal']['std'][i], std, rtol=sum_rtol(images[..., 0].size))
  after, _ = jax.jit(algo.aggregate)(trained, agg_mask, data['train']['count'].astype(jnp.float32),
                                     jnp.int32(0))
  assert all(leaves_equal_across_clients(after['params']))
  assert all(leaves_equal_across_clients(after['batch_stats']))
  assert not all(leaves_equal_across_clients(trained['params']))
  # Evaluation (validate_seg): the client's own statistics, numpy-normalised here.
  one = lambda t: jax.tree.map(lambda v: v[1], t)
  x = np.asarray(data['test']['image'][1, :2])
  mean, std = (np.asarray(trained['personal'][n][1]) for n in ('mean', 'std'))
  want = algo.method.apply_eval(one(after['params']), one(after['batch_stats']),
                                jnp.asarray((x - mean) / (std + 1e-8)))
  got = algo.method.predictor(one(after['params']), one(after['batch_stats']),
                              one(trained['personal']))(jnp.asarray(x))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
