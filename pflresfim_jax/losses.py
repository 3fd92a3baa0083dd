"""Segmentation losses (METHOD.md 3 and 5).

All per-example functions take logits/labels of ONE image ``[H, W, 1]`` or a batch
``[N, H, W, 1]`` (then return ``[N]``); batch losses take an optional example mask
``[N]`` (padded examples weigh nothing).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

Array = jax.Array

DICE_SMOOTH = 1e-6


def _per_example_axes(x: Array):
  return tuple(range(1, x.ndim)) if x.ndim == 4 else tuple(range(x.ndim))


def bce(logits: Array, labels: Array) -> Array:
  """Pixel-mean binary cross-entropy with logits: the per-image NLL.

  ``[H, W, 1] -> []`` or ``[N, H, W, 1] -> [N]``.
  """
  l = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32),
                                         labels.astype(jnp.float32))
  return l.mean(axis=_per_example_axes(l))


def soft_dice(logits: Array, labels: Array) -> Array:
  """Soft Dice per image, ``(2 sum(p g) + 1e-6) / (sum p + sum g + 1e-6)``, p = sigmoid."""
  p = jax.nn.sigmoid(logits.astype(jnp.float32))
  g = labels.astype(jnp.float32)
  axes = _per_example_axes(p)
  return (2 * (p * g).sum(axes) + DICE_SMOOTH) / (p.sum(axes) + g.sum(axes) + DICE_SMOOTH)


def dice_bce(logits: Array, labels: Array) -> Array:
  """The training loss per image: ``0.5 * BCE + 0.5 * (1 - soft Dice)``."""
  return 0.5 * bce(logits, labels) + 0.5 * (1.0 - soft_dice(logits, labels))


def masked_mean(values: Array, mask: Optional[Array] = None) -> Array:
  """Mean of ``values [N]`` over the examples where ``mask [N]`` is True (0 if none)."""
  if mask is None:
    return values.mean()
  w = mask.astype(values.dtype)
  return (values * w).sum() / jnp.maximum(w.sum(), 1.0)


def dice_bce_loss(logits: Array, labels: Array, mask: Optional[Array] = None) -> Array:
  """Batch training loss: mean over real examples of :func:`dice_bce`."""
  return masked_mean(dice_bce(logits, labels), mask)


PER_EXAMPLE = {'nll': bce, 'train': dice_bce}


def per_example(name: str):
  """The per-image loss named by config ``fisher.loss`` ('nll' or 'train')."""
  try:
    return PER_EXAMPLE[name]
  except KeyError:
    raise ValueError(f"fisher.loss must be one of {sorted(PER_EXAMPLE)}, got {name!r}") from None
