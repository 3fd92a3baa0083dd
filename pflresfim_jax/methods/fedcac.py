"""FedCAC (Wu et al., 2023): critical entries mixed among collaborators, the rest averaged.

Client: after training, its critical entries are the ``fedcac.tau`` fraction per tensor
with the largest ``|(theta - theta_start) * theta|``. Server: clients whose critical
sets overlap above a threshold that rises from the least to the most overlapping pair
over ``fedcac.beta`` rounds collaborate; a client's critical entries become the mean
over its collaborators, its other entries the mean over all clients. Every entry is
uploaded (the contract's params='all').
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pflresfim_jax import aggregate, masks
from pflresfim_jax.methods.base import Contract, Method


def collaborators(critical, weights: jax.Array, rnd: jax.Array, beta: float) -> jax.Array:
  """``[K, K]`` bool: k averages its critical entries with j (itself included)."""
  k = weights.shape[0]
  flat = [m.reshape(k, -1).astype(jnp.float32) for m in jax.tree.leaves(critical)]
  both = sum(jnp.einsum('i...,j...->ij', m, m) for m in flat)
  overlap = both / jnp.maximum(jnp.diag(both)[:, None], 1.0)
  present = weights > 0
  pair = present[:, None] & present[None, :] & ~jnp.eye(k, dtype=bool)
  lo = jnp.min(jnp.where(pair, overlap, jnp.inf))
  hi = jnp.max(jnp.where(pair, overlap, -jnp.inf))
  threshold = lo + (hi - lo) * rnd.astype(jnp.float32) / beta
  return ((overlap >= threshold) & pair) | jnp.eye(k, dtype=bool)


class FedCAC(Method):
  contract = Contract(params='all')
  dynamic_mask = True

  def client_stats(self, state, start, data, bank, keys, rnd, client_ids):
    sensitivity = jax.tree.map(lambda new, old: jnp.abs((new - old) * new), state['params'], start)
    tau = self.config.fedcac.tau
    critical = jax.vmap(lambda s: masks.top_fraction(s, tau, 'tensor'))(sensitivity)
    return {**state, 'local_mask': critical}, critical

  def mix(self, params, critical, weights, rnd):
    collab = collaborators(critical, weights, rnd, self.config.fedcac.beta)
    shared = aggregate.fedavg(params, weights)
    grouped = aggregate.group_mean(params, collab, weights)
    mixed = jax.tree.map(lambda m, g, s: jnp.where(m, g, s), critical, grouped, shared)
    return mixed, {'collaborators': collab.sum(1)}
