"""FedLWS (Shi et al., 2025): FedAvg with every layer scaled down by a factor set from the clients' spread.

As FL-MedSegBench (server_funct.py ``Server_update``, 'fedlws', after the authors'
FedLWS code), per layer l, with g_l the last global model (the server's state),
theta_kl the clients' layers, p the normalised aggregation weights:

    m_l     = sum_k p_k theta_kl                       (FedAvg)
    spread  = mean_k || (theta_kl - g_l) - mean_j (theta_jl - g_l) ||
    tau_l   = clip(beta * spread, min_tau, max_tau)
    gamma_l = ||g_l|| / (||g_l|| + tau_l * ||m_l - g_l||)
    new_l   = gamma_l * m_l

with ``fedlws.beta`` 0.03, ``min_tau`` 0.01, ``max_tau`` 0.05 (the Fundus scripts).
A layer is one module's parameters (a conv's kernel and bias, a BatchNorm's scale and
bias). Kept apart from the reference: there a layer is the run of state-dict entries
up to the next 'bias' key, so each conv's layer also holds the previous BatchNorm's
running statistics and its integer batch counter, which enter the norms and get
scaled; here BatchNorm statistics are averaged as FedAvg does and never scaled.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import jax
import jax.numpy as jnp

from pflresfim_jax import aggregate, models
from pflresfim_jax.methods.base import local_fraction
from pflresfim_jax.methods.simple import FedAvg


def layers(tree) -> Dict[Tuple, List[int]]:
  """Leaf indices (``jax.tree.leaves`` order) grouped by their module: the key path
  without its last key (``('enc1_0', 'conv')`` holds kernel and bias)."""
  out: Dict[Tuple, List[int]] = {}
  for i, (path, _) in enumerate(jax.tree_util.tree_flatten_with_path(tree)[0]):
    out.setdefault(models.path_keys(path)[:-1], []).append(i)
  return out


def layer_factor(stacked: List[jax.Array], g: List[jax.Array], p: jax.Array, present: jax.Array,
                 beta: float, min_tau: float, max_tau: float) -> jax.Array:
  """gamma of one layer from its leaves: ``stacked`` ``[K, ...]`` each, ``g`` unstacked."""
  flat = jnp.concatenate([x.reshape(x.shape[0], -1) for x in stacked], axis=1)   # [K, N]
  last = jnp.concatenate([x.reshape(-1) for x in g])                             # [N]
  n = jnp.maximum(jnp.sum(present), 1)
  delta = flat - last
  mean_delta = jnp.sum(jnp.where(present[:, None], delta, 0.0), axis=0) / n
  spread = jnp.sum(jnp.where(present, jnp.linalg.norm(delta - mean_delta, axis=1), 0.0)) / n
  tau = jnp.clip(beta * spread, min_tau, max_tau)
  step = jnp.linalg.norm(p @ flat - last)
  norm = jnp.linalg.norm(last)
  return norm / (norm + tau * step)


class FedLWS(FedAvg):
  def server_init(self, client):
    return {'global': client['params']}

  def aggregate(self, state, agg_mask, weights, rnd):
    cfg = self.config.fedlws
    present = weights > 0
    p = weights / jnp.maximum(jnp.sum(weights), 1e-12)
    leaves, treedef = jax.tree.flatten(state['params'])
    g = [x[0] for x in jax.tree.leaves(state['server']['global'])]
    new = list(leaves)
    for idx in layers(state['params']).values():
      gamma = layer_factor([leaves[i] for i in idx], [g[i] for i in idx], p, present,
                           cfg.beta, cfg.min_tau, cfg.max_tau)
      for i in idx:
        mean = jnp.tensordot(p, leaves[i], axes=1) * gamma
        new[i] = jnp.broadcast_to(mean, leaves[i].shape).astype(leaves[i].dtype)
    params = jax.tree.unflatten(treedef, new)
    state = {**state, 'params': params, 'server': {'global': params},
             'batch_stats': aggregate.fedavg(state['batch_stats'], weights)}
    return state, local_fraction(state)
