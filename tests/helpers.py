"""Small shared fixtures for the tests (tiny models and data) and float tolerances.

Tolerances: XLA compiles for the host's instruction set (SSE, AVX2, AVX-512), which
changes the order and width of its sums, so float results move in their last digits
from one CPU to another. A comparison between two different computations therefore
allows the error its reductions can make: relative where the values are not near
zero, scaled with the number of terms where sums are compared (``sum_rtol``), and
with the size of the terms where they cancel (``atol_rel``). Exact equality is kept
for the same compiled program run twice, and for values that are exact in float32.
"""
import jax
import jax.numpy as jnp
import numpy as np

from pflresfim_jax import models

EPS32 = float(np.finfo(np.float32).eps)


def sum_rtol(terms: int, safety: float = 4.0) -> float:
  """Error of a float32 sum of ``terms`` terms relative to the sum of their magnitudes.

  ``terms * eps`` bounds recursive summation in any order (the order XLA picks depends
  on the instruction set); ``safety`` covers the few operations around the sum.
  """
  return safety * max(int(terms), 1) * EPS32


def tiny_unet(size=16, base=2, seed=0, levels=3):
  """A small UNet2D and its variables. Three levels keep pooling, upsampling and skip
  connections at a fraction of the reference's compile time (test_models.py checks
  that fewer levels are the reference cut short)."""
  model = models.UNet2D(base=base, levels=levels)
  params, stats = models.init(model, jax.random.PRNGKey(seed), (size, size, 3))
  return model, params, stats


def random_batch(n, size=16, seed=0):
  rng = np.random.default_rng(seed)
  image = rng.uniform(size=(n, size, size, 3)).astype(np.float32)
  label = (rng.uniform(size=(n, size, size, 1)) > 0.7).astype(np.float32)
  return {'image': jnp.asarray(image), 'label': jnp.asarray(label)}


def flat64(tree) -> np.ndarray:
  """Every leaf of a pytree, raveled in leaf order and concatenated, as float64."""
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def assert_tree_close(got, want, *, rtol, atol_rel=0.0):
  """Leaf by leaf: ``|got - want| <= rtol * |want| + atol_rel * max|want|``.

  ``atol_rel`` scales the absolute slack with the leaf's largest value: where a
  quantity is a sum whose terms cancel (a difference, an entry near zero), its float
  error follows the size of the terms, not of the result.
  """
  def leaf(g, w):
    w = np.asarray(w, np.float64)
    scale = float(np.max(np.abs(w))) if w.size else 0.0
    np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=rtol, atol=atol_rel * scale)
  jax.tree.map(leaf, got, want)
