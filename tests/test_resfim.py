import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pflresfim_jax import fisher, losses, models, resfim, spectral
from helpers import random_batch, tiny_unet

estimate = jax.jit(resfim.estimate, static_argnames=(
    'apply_fn', 'spectral_ratio', 'lam_range', 'loss', 'kind', 'chunk_size', 'eps', 'value_range'))


@pytest.fixture(scope='module')
def setup():
  model, params, stats = tiny_unet()
  return models.inference_fn(model), params, stats, random_batch(6)


def test_zero_when_simulated_equals_original(setup):
  apply_fn, params, stats, batch = setup
  r = estimate(params, {**batch, 'sim_image': batch['image']}, apply_fn=apply_fn,
                      model_state=stats)
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(r)) == 0.0


def test_lam_zero_gives_zero(setup):
  apply_fn, params, stats, batch = setup
  bank = spectral.amplitude_bank(batch['image'], 0.1)
  r = estimate(params, batch, apply_fn=apply_fn, model_state=stats, key=jax.random.PRNGKey(0),
                      bank=bank, bank_owner=jnp.array([0, 0, 1, 1, 2, 2]), client_id=0,
                      spectral_ratio=0.1, lam_range=(0.0, 0.0))
  # lam = 0 leaves the images as they were up to FFT round-off.
  loss = lambda p, ex: losses.bce(apply_fn(p, stats, ex['image'][None])[0], ex['label'])
  f0 = jax.jit(lambda p, b: fisher.diagonal(loss, p, b))(params, batch)
  jax.tree.map(lambda x, f: np.testing.assert_array_less(np.asarray(x), 1e-3 * float(f.max()) + 1e-12),
               r, f0)


def test_equals_fisher_difference(setup):
  apply_fn, params, stats, batch = setup
  key = jax.random.PRNGKey(3)
  bank = spectral.amplitude_bank(batch['image'][::-1], 0.1)
  owner = jnp.array([1, 1, 1, 2, 2, 2])
  r = estimate(params, batch, apply_fn=apply_fn, model_state=stats, key=key, bank=bank,
                      bank_owner=owner, client_id=0, spectral_ratio=0.1, chunk_size=4)
  sim = spectral.simulate(key, batch['image'], 0, bank, owner, 0.1)
  loss = lambda p, ex: losses.bce(apply_fn(p, stats, ex['image'][None])[0], ex['label'])
  diag = jax.jit(lambda p, b: fisher.diagonal(loss, p, b, 1))
  f0 = diag(params, batch)
  f1 = diag(params, {**batch, 'image': sim})
  jax.tree.map(lambda got, a, b: np.testing.assert_allclose(
      got, np.abs(b - a), rtol=1e-3, atol=1e-4 * float(jnp.maximum(a.max(), b.max()))), r, f0, f1)
  assert sum(float(x.sum()) for x in jax.tree.leaves(r)) > 0
  rel = resfim.residual(f0, f1, 'relative', 1e-8)
  jax.tree.map(lambda got, a, b: np.testing.assert_allclose(got, np.abs(b - a) / (a + 1e-8), rtol=1e-5),
               rel, f0, f1)


def test_needs_a_bank_or_simulated_images(setup):
  apply_fn, params, stats, batch = setup
  with pytest.raises(ValueError, match='bank'):
    resfim.estimate(params, batch, apply_fn=apply_fn, model_state=stats)
  with pytest.raises(ValueError, match='residual'):
    resfim.residual({'a': jnp.ones(1)}, {'a': jnp.ones(1)}, 'squared')


def test_partition_counts_per_tensor(setup):
  _, params, _, _ = setup
  scores = jax.tree.map(lambda p: jax.random.uniform(jax.random.PRNGKey(p.size), p.shape), params)
  mask = resfim.partition(scores, 0.2)
  for m in jax.tree.leaves(mask):
    assert int(m.sum()) == int(np.ceil(0.2 * m.size - 1e-9))
