"""Segmentation metrics (METHOD.md 7): per-image Dice, IoU, sensitivity, specificity.

Prediction = ``sigmoid(logit) > 0.5`` at network resolution (``logit > 0``); every
metric is computed per image, then averaged over the real (unpadded) images. The
formulas are FL-MedSegBench's (utils.py ``dice_fn``, ``iou_fn``,
``sensitivity_specificity_fn``): Dice and IoU smooth numerator and denominator by 1e-6
(an empty label predicted empty scores 1); sensitivity and specificity only the
denominator (an empty label scores sensitivity 0).
"""
from __future__ import annotations

from typing import Callable, Dict

import jax
import jax.numpy as jnp

Array = jax.Array
SMOOTH = 1e-6
METRICS = ('dice', 'iou', 'sensitivity', 'specificity')


def per_image(logits: Array, labels: Array, threshold: float = 0.5) -> Dict[str, Array]:
  """``logits, labels [N, H, W, 1]`` -> dict of ``[N]`` metrics (Dice etc., in [0, 1])."""
  p = jax.nn.sigmoid(logits.astype(jnp.float32)) > threshold
  g = labels > 0.5
  axes = tuple(range(1, p.ndim))
  tp = jnp.sum(p & g, axes).astype(jnp.float32)
  fp = jnp.sum(p & ~g, axes).astype(jnp.float32)
  fn = jnp.sum(~p & g, axes).astype(jnp.float32)
  tn = jnp.sum(~p & ~g, axes).astype(jnp.float32)
  return {
      'dice': (2 * tp + SMOOTH) / (2 * tp + fp + fn + SMOOTH),
      'iou': (tp + SMOOTH) / (tp + fp + fn + SMOOTH),
      'sensitivity': tp / (tp + fn + SMOOTH),
      'specificity': tn / (tn + fp + SMOOTH),
  }


def evaluate(predict: Callable[[Array], Array], images: Array, labels: Array, count,
             batch_size: int = 16, threshold: float = 0.5) -> Dict[str, Array]:
  """Mean metrics of one client's model over its first ``count`` images.

  Args:
    predict: ``images [B, H, W, C] -> logits [B, H, W, 1]``.
    images: ``[N, H, W, C]`` (padded); labels ``[N, H, W, 1]``.
    count: number of real images (traced int is fine).
    batch_size: images per forward pass (bounds memory).

  Returns:
    dict of scalars (0 where ``count`` is 0).
  """
  n = images.shape[0]
  bs = max(1, min(batch_size, n))
  nb = -(-n // bs)
  pad = nb * bs - n
  xs = jnp.pad(images, ((0, pad),) + ((0, 0),) * (images.ndim - 1)).reshape(nb, bs, *images.shape[1:])
  ys = jnp.pad(labels, ((0, pad),) + ((0, 0),) * (labels.ndim - 1)).reshape(nb, bs, *labels.shape[1:])
  per = jax.lax.map(lambda xy: per_image(predict(xy[0]), xy[1], threshold), (xs, ys))
  valid = (jnp.arange(nb * bs) < count).astype(jnp.float32)
  denom = jnp.maximum(valid.sum(), 1.0)
  return {k: jnp.sum(v.reshape(-1) * valid) / denom for k, v in per.items()}
