"""FedProx (Li et al., 2020): FedAvg with a proximal pull towards the round's start.

Local loss = segmentation loss + mu/2 * ||theta - theta_start||^2 (``fedprox.mu``).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from pflresfim_jax.methods.simple import FedAvg


def sq_distance(a, b) -> jax.Array:
  """Sum of squared differences of two pytrees of the same structure."""
  return sum(jnp.sum(jnp.square(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def proximal(loss: Callable, mu: float) -> Callable:
  """``loss`` plus ``mu/2 * ||params - anchor||^2``, the anchor passed as ``aux``."""
  def with_pull(params, stats, batch, mask, anchor):
    value, new_stats = loss(params, stats, batch, mask)
    return value + 0.5 * mu * sq_distance(params, anchor), new_stats
  return with_pull


class FedProx(FedAvg):
  def __init__(self, ctx):
    super().__init__(ctx)
    self.loss = proximal(self.loss, self.config.fedprox.mu)

  def loss_aux(self, state):
    return state['params']     # the anchor: the parameters the round started from
