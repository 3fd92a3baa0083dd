import jax.numpy as jnp
import numpy as np
import pytest

from pflresfim_jax import evaluation
from helpers import sum_rtol

pytestmark = pytest.mark.reference


def test_per_image_against_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 8, 8, 1)).astype(np.float32)
  labels = (rng.uniform(size=(5, 8, 8, 1)) > 0.6).astype(np.float32)
  labels[4] = 0  # empty label, empty-ish prediction: smoothing keeps it finite
  got = evaluation.per_image(jnp.asarray(logits), jnp.asarray(labels))
  # Pixel counts are exact in float32; what is left is one division and the 1e-6
  # smoothing: a few ulps.
  for i in range(5):
    p, g = logits[i] > 0, labels[i] > 0.5
    tp, fp, fn, tn = (p & g).sum(), (p & ~g).sum(), (~p & g).sum(), (~p & ~g).sum()
    np.testing.assert_allclose(got['dice'][i], (2 * tp + 1e-6) / (p.sum() + g.sum() + 1e-6), rtol=1e-5)
    np.testing.assert_allclose(got['iou'][i], (tp + 1e-6) / ((p | g).sum() + 1e-6), rtol=1e-5)
    np.testing.assert_allclose(got['sensitivity'][i], tp / (tp + fn + 1e-6), rtol=1e-5)
    np.testing.assert_allclose(got['specificity'][i], tn / (tn + fp + 1e-6), rtol=1e-5)
  # FL-MedSegBench's conventions on an empty label: Dice 1 when nothing is predicted,
  # sensitivity 0 whatever is predicted.
  empty = np.zeros((2, 8, 8, 1), np.float32)
  got = evaluation.per_image(jnp.asarray(np.stack([-np.ones((8, 8, 1)), np.ones((8, 8, 1))])), jnp.asarray(empty))
  assert np.asarray(got['sensitivity']).tolist() == [0.0, 0.0]
  np.testing.assert_allclose(got['dice'], [1.0, 1e-6 / (64 + 1e-6)], rtol=1e-5)
  np.testing.assert_allclose(got['specificity'], [64 / (64 + 1e-6), 0.0], rtol=1e-6, atol=0)


def test_evaluate_ignores_padding_and_batches():
  rng = np.random.default_rng(1)
  images = rng.normal(size=(7, 4, 4, 1)).astype(np.float32)
  labels = (rng.uniform(size=(7, 4, 4, 1)) > 0.5).astype(np.float32)
  predict = lambda x: x  # the image is its own logit
  want = evaluation.per_image(jnp.asarray(images[:5]), jnp.asarray(labels[:5]))['dice'].mean()
  images[5:] = 50.0  # padding
  for bs in (1, 3, 16):
    got = evaluation.evaluate(predict, jnp.asarray(images), jnp.asarray(labels), 5, batch_size=bs)
    # The mean of 5 per-image Dice values in another batching: 5 eps of the values.
    np.testing.assert_allclose(got['dice'], want, rtol=sum_rtol(5))
  assert float(evaluation.evaluate(predict, jnp.asarray(images), jnp.asarray(labels), 0)['dice']) == 0.0
