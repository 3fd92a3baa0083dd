import numpy as np
import jax.numpy as jnp
import pytest

from pflresfim_jax import losses
from helpers import sum_rtol

pytestmark = pytest.mark.reference


def np_reference(logits, labels):
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  bce = -(labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean(axis=(1, 2, 3))
  dice = (2 * (p * labels).sum((1, 2, 3)) + 1e-6) / (p.sum((1, 2, 3)) + labels.sum((1, 2, 3)) + 1e-6)
  return bce, dice


def test_against_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 8, 8, 1)).astype(np.float32) * 3
  labels = (rng.uniform(size=(4, 8, 8, 1)) > 0.5).astype(np.float32)
  bce, dice = np_reference(logits, labels)
  # Per-image means over 8x8 pixels against float64 (and a mean of 4 images on top).
  tol = sum_rtol(8 * 8 * 4)
  np.testing.assert_allclose(losses.bce(jnp.asarray(logits), jnp.asarray(labels)), bce, rtol=tol)
  np.testing.assert_allclose(losses.soft_dice(jnp.asarray(logits), jnp.asarray(labels)), dice, rtol=tol)
  want = (0.5 * bce + 0.5 * (1 - dice)).mean()
  np.testing.assert_allclose(losses.dice_bce_loss(jnp.asarray(logits), jnp.asarray(labels)), want, rtol=tol)
  # single image form
  np.testing.assert_allclose(losses.bce(jnp.asarray(logits[0]), jnp.asarray(labels[0])), bce[0], rtol=tol)


def test_mask_ignores_padding():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(5, 8, 8, 1)), jnp.float32)
  labels = jnp.asarray(rng.uniform(size=(5, 8, 8, 1)) > 0.5, jnp.float32)
  mask = jnp.array([True, True, True, False, False])
  padded = logits.at[3:].set(100.0)
  # Per-image losses over 8x8 pixels, then a mean of 3 in two batch shapes.
  np.testing.assert_allclose(losses.dice_bce_loss(padded, labels, mask),
                             losses.dice_bce_loss(logits[:3], labels[:3]), rtol=sum_rtol(8 * 8 + 3))
