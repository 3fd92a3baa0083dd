import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pflresfim_jax import fisher, losses, models
from helpers import assert_tree_close, random_batch, sum_rtol, tiny_unet

pytestmark = pytest.mark.reference
# Fisher entries are means of squared per-example gradients; each gradient entry sums
# over the 16 x 16 pixels of an image (and its error doubles when squared), so chunked
# vmap(grad) and the batch-1 loop agree to ~2 x 256 eps, relative.
FISHER_RTOL = sum_rtol(2 * 16 * 16)


def reference(loss_fn, params, batch, mask=None):
  """A Python loop of per-example jax.grad, squared and averaged."""
  n = batch['image'].shape[0]
  keep = [i for i in range(n) if mask is None or mask[i]]
  acc = jax.tree.map(lambda p: np.zeros(p.shape, np.float64), params)
  grad = jax.jit(jax.grad(loss_fn))
  for i in keep:
    g = grad(params, {k: v[i] for k, v in batch.items()})
    acc = jax.tree.map(lambda a, x: a + np.asarray(x, np.float64) ** 2, acc, g)
  return jax.tree.map(lambda a: a / len(keep), acc)


@pytest.fixture(scope='module')
def setup():
  model, params, stats = tiny_unet()
  apply_fn = models.inference_fn(model)

  def loss_fn(p, ex):
    return losses.bce(apply_fn(p, stats, ex['image'][None])[0], ex['label'])
  return loss_fn, params, random_batch(7)


@pytest.mark.parametrize('chunk', [1, 3, 7, 16])
def test_matches_loop_for_any_chunk(setup, chunk):
  loss_fn, params, batch = setup
  want = reference(loss_fn, params, batch)
  got = fisher.diagonal(loss_fn, params, batch, chunk_size=chunk)
  assert_tree_close(got, want, rtol=FISHER_RTOL, atol_rel=FISHER_RTOL)


def test_example_mask(setup):
  loss_fn, params, batch = setup
  mask = np.array([1, 0, 1, 1, 0, 0, 1], bool)
  want = reference(loss_fn, params, batch, mask)
  got = jax.jit(lambda p, b, m: fisher.diagonal(loss_fn, p, b, 3, m))(params, batch, jnp.asarray(mask))
  assert_tree_close(got, want, rtol=FISHER_RTOL, atol_rel=FISHER_RTOL)


def test_linear_model_closed_form():
  """Least squares: grad_w = (w.x - y) x, so F = mean((w.x - y)^2 x^2)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(10, 4)).astype(np.float32)
  y = rng.normal(size=(10,)).astype(np.float32)
  w = rng.normal(size=(4,)).astype(np.float32)
  loss = lambda p, ex: 0.5 * (jnp.dot(p['w'], ex['x']) - ex['y']) ** 2
  got = fisher.diagonal(loss, {'w': jnp.asarray(w)}, {'x': jnp.asarray(x), 'y': jnp.asarray(y)}, 4)
  r = x @ w - y
  # Dot products of 4 terms, squared, a mean of 10 (numpy computes in float32 too).
  np.testing.assert_allclose(got['w'], np.mean((r[:, None] * x) ** 2, axis=0), rtol=sum_rtol(2 * 4 + 10))


@pytest.mark.parametrize('chunk,unroll', [(1, False), (3, False), (3, True)])
def test_diagonals_one_per_batch(setup, chunk, unroll):
  """G Fishers in one loop: each the loop reference of its own batch and mask."""
  loss_fn, params, batch = setup
  other = {'image': batch['image'][::-1] * 0.5, 'label': batch['label']}
  mask = np.array([[1, 1, 0, 1, 1, 0, 1], [0, 1, 1, 1, 0, 0, 0]], bool)
  stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), batch, other)
  got = jax.jit(lambda p, b, m: fisher.diagonals(loss_fn, p, b, chunk, m, unroll))(
      params, stacked, jnp.asarray(mask))
  for k, b in enumerate((batch, other)):
    want = reference(loss_fn, params, b, mask[k])
    assert_tree_close(jax.tree.map(lambda f: f[k], got), want, rtol=FISHER_RTOL,
                      atol_rel=FISHER_RTOL)


def test_trailing_padding_is_not_computed(setup):
  """Chunks after the last real example are skipped: NaN there cannot leak in (a
  computed chunk would add 0 * NaN)."""
  loss_fn, params, batch = setup
  mask = np.array([1, 1, 0, 1, 0, 0, 0], bool)
  poisoned = {**batch, 'image': batch['image'].at[4:].set(jnp.nan)}
  got = jax.jit(lambda p, b, m: fisher.diagonal(loss_fn, p, b, 2, m))(
      params, poisoned, jnp.asarray(mask))
  want = reference(loss_fn, params, batch, mask)
  assert_tree_close(got, want, rtol=FISHER_RTOL, atol_rel=FISHER_RTOL)
