"""FedCAC (Wu et al., 2023): critical entries mixed among collaborators, the rest averaged.

Follows the official code (FLAIR-Community/Fling: fling/component/client/fedcac_client.py
``evaluate_critical_parameter``, fling/component/group/fedcac_group.py
``get_customized_global_models`` and ``sync``):

- client, per tensor: score ``c = |(theta - theta_start) * theta|``; with
  ``n_crit = floor(tau * size)`` the entries with ``c >= `` the n_crit-th largest score
  are critical (ties all in; none when n_crit = 0); when that threshold is <= 1e-10,
  the threshold becomes the smallest score above 1e-20 (so only nonzero scores are
  critical; if there is none, the first threshold stays).
- server: overlap of i with j = ``1 - sum|c_i - c_j| / (2 sum c_i)`` over all entries;
  threshold at round r = ``mean + (r + 1) / beta * (max - mean)`` over the ordered pairs
  i != j; i's collaborators are i and every j with overlap >= threshold. Critical
  entries become the plain (unweighted) mean over the collaborators, the others the
  training-set-size weighted mean over all clients (Fling's fed_avg). BatchNorm running
  statistics stay local (Fling's sync sets parameters only).

Clients absent from a round (weight 0) take no part in any pair. Every entry is
uploaded (the contract's params='all').
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pflresfim_jax import aggregate, selectors
from pflresfim_jax.methods.base import Contract, Method


def critical(score: jax.Array, tau: float) -> jax.Array:
  """bool mask like ``score`` (one tensor of one client): Fling's critical entries."""
  flat = score.ravel()
  count = int(tau * flat.size)
  if count == 0:
    return jnp.zeros(score.shape, bool)
  kth = jnp.sort(flat)[flat.size - count]            # the count-th largest score
  tiny = flat > 1e-20
  smallest_nonzero = jnp.min(jnp.where(tiny, flat, jnp.inf))
  threshold = jnp.where((kth <= 1e-10) & jnp.any(tiny), smallest_nonzero, kth)
  return score >= threshold


def collaborators(crit, weights: jax.Array, rnd: jax.Array, beta: float) -> jax.Array:
  """``[K, K]`` bool: k averages its critical entries with j (itself included).

  ``crit``: pytree of bool ``[K, ...]``; ``weights``: ``[K]`` (0 = absent this round).
  """
  k = weights.shape[0]
  flat = jnp.concatenate([m.reshape(k, -1).astype(jnp.float32) for m in jax.tree.leaves(crit)], 1)
  size = flat.sum(1)
  # sum|c_i - c_j| for 0/1 masks: |c_i| + |c_j| - 2 |c_i and c_j|.
  both = flat @ flat.T
  differ = size[:, None] + size[None, :] - 2.0 * both
  overlap = 1.0 - differ / jnp.maximum(2.0 * size[:, None], 1.0)   # guard: no critical entry
  present = weights > 0
  pair = present[:, None] & present[None, :] & ~jnp.eye(k, dtype=bool)
  mean = jnp.sum(jnp.where(pair, overlap, 0.0)) / jnp.maximum(pair.sum(), 1)
  top = jnp.max(jnp.where(pair, overlap, -jnp.inf))
  threshold = mean + (rnd.astype(jnp.float32) + 1.0) / beta * (top - mean)
  return ((overlap >= threshold) & pair) | jnp.eye(k, dtype=bool)


class FedCAC(Method):
  contract = Contract(params='all')
  dynamic_mask = True

  def client_stats(self, state, start, data, bank, keys, rnd, client_ids):
    tau = self.config.fedcac.tau
    score = selectors.update_score(state['params'], start)
    crit = jax.tree.map(lambda s: jax.vmap(lambda x: critical(x, tau))(s), score)
    return {**state, 'local_mask': crit}, crit

  def mix(self, params, crit, weights, rnd):
    collab = collaborators(crit, weights, rnd, self.config.fedcac.beta)
    shared = aggregate.fedavg(params, weights)
    # Fling's customized global model: the plain mean over the collaborators.
    grouped = aggregate.group_mean(params, collab, (weights > 0).astype(jnp.float32))
    mixed = jax.tree.map(lambda m, g, s: jnp.where(m, g, s), crit, grouped, shared)
    return mixed, {'collaborators': collab.sum(1)}
