"""FedNova (Wang et al., 2020): FedAvg with each client's update normalised by its steps.

As FL-MedSegBench's server (server_funct.py ``Server_update``, 'fednova'), over the
clients present with weights ``p_j`` (normalised aggregation weights) and local steps
``tau_j`` (batches per epoch, ``len(train_loader)``; the epochs E are the same for all
and cancel):

    tau_eff = sum_j p_j tau_j,      a_j = p_j tau_eff / tau_j
    g_new   = (1 - sum_j a_j) g_old + sum_j a_j theta_j

for every parameter and BatchNorm statistic; every client then continues from g_new.
``g_old``, the model the server sent last round (at first the initial model), is the
server's state (``state['server']``). With the default ``aggregate_weights='batches'``
(p_j proportional to tau_j), a_j = tau_eff / sum tau for every client: the unweighted
mean of the clients' models, extrapolated from g_old by sum a_j >= 1.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pflresfim_jax.methods.base import local_fraction
from pflresfim_jax.methods.simple import FedAvg


def coefficients(weights: jax.Array, steps: jax.Array) -> jax.Array:
  """``a [K]`` from weights ``[K]`` and local steps ``[K]`` (a client with 0 weight or 0
  steps is absent and gets 0)."""
  present = (weights > 0) & (steps > 0)
  p = jnp.where(present, weights, 0.0) / jnp.maximum(jnp.sum(jnp.where(present, weights, 0.0)),
                                                     1e-12)
  tau_eff = jnp.sum(p * steps)
  return jnp.where(present, p * tau_eff / jnp.where(present, steps, 1.0), 0.0)


def normalised_mean(stacked, previous, a: jax.Array):
  """``(1 - sum a) * previous + sum_j a_j stacked[j]`` per leaf, the result broadcast to
  every client: ``stacked`` ``[K, ...]``, ``previous`` ``[K, ...]`` (identical slots)."""
  def leaf(theta, g):
    w = a.reshape((-1,) + (1,) * (theta.ndim - 1))
    new = (1.0 - jnp.sum(a)) * g[0] + jnp.sum(w * theta, axis=0)
    return jnp.broadcast_to(new, theta.shape).astype(theta.dtype)
  return jax.tree.map(leaf, stacked, previous)


class FedNova(FedAvg):
  def server_init(self, client):
    return {'params': client['params'], 'batch_stats': client['batch_stats']}

  def steps(self, weights: jax.Array) -> jax.Array:
    """Local steps per epoch ``[K]`` from the aggregation weights (client_weights)."""
    if self.config.aggregate_weights == 'batches':
      return weights
    return jnp.ceil(weights / self.config.batch_size)

  def aggregate(self, state, agg_mask, weights, rnd):
    a = coefficients(weights, self.steps(weights))
    g = state['server']
    params = normalised_mean(state['params'], g['params'], a)
    stats = normalised_mean(state['batch_stats'], g['batch_stats'], a)
    state = {**state, 'params': params, 'batch_stats': stats,
             'server': {'params': params, 'batch_stats': stats}}
    return state, local_fraction(state)
