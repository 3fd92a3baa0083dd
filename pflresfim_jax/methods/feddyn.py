"""FedDyn (Acar et al., 2021): a dynamic regulariser on each client, a corrected mean on the server.

As FL-MedSegBench (client_funct_seg.py ``client_feddyn`` and its update of
``old_grad``; server_funct.py ``Server_update``, 'feddyn'), with ``mu`` = ``feddyn.mu``
(0.01, main_seg.py) and g the global model a client received this round:

client   loss = Dice+BCE + mu/2 * ||theta - g||_2 - <theta, grad_k>   (the norm unsquared,
                as the reference)
         after training: grad_k <- grad_k - mu * (theta_k - g)          (kept by the client)
server   h <- h - mu * sum_k p_k (theta_k - g)
         g <- sum_k p_k theta_k - h / mu
         BatchNorm statistics: the first present client's (the reference copies the
         server model from client 0's upload, buffers included)

over parameters only (``model.parameters()``); p_k are the normalised aggregation
weights. ``grad_k`` lives in ``personal['old_grad']`` (never sent); the server's state
is ``{'h', 'global'}``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from pflresfim_jax import aggregate, masks
from pflresfim_jax.methods.base import local_fraction
from pflresfim_jax.methods.simple import FedAvg


def tree_norm(a) -> jax.Array:
  """The L2 norm of a pytree, with gradient 0 at 0 (as torch.norm's backward; every
  round's first step starts at theta = g, where sqrt's own gradient is infinite)."""
  sq = optax.tree_utils.tree_vdot(a, a)
  return jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)


def first_present(stacked, weights: jax.Array):
  """Every slot gets the leaves of the first client with weight > 0 (``[K, ...]``)."""
  idx = jnp.argmax(weights > 0)
  return jax.tree.map(lambda x: jnp.broadcast_to(x[idx], x.shape), stacked)


class FedDyn(FedAvg):
  def __init__(self, ctx):
    super().__init__(ctx)
    seg, mu = self.loss, self.config.feddyn.mu

    def loss(params, stats, batch, mask, aux):
      value, new_stats = seg(params, stats, batch, mask)
      diff = jax.tree.map(jnp.subtract, params, aux['global'])
      linear = optax.tree_utils.tree_vdot(params, aux['old_grad'])
      return value + 0.5 * mu * tree_norm(diff) - linear, new_stats
    self.loss = loss

  def init_client(self, key):
    state = super().init_client(key)
    zeros = jax.tree.map(jnp.zeros_like, state['params'])
    return {**state, 'personal': {'old_grad': zeros}}

  def server_init(self, client):
    return {'h': jax.tree.map(jnp.zeros_like, client['params']), 'global': client['params']}

  def loss_aux(self, state):
    return {'global': state['params'], 'old_grad': state['personal']['old_grad']}

  def train(self, state, data, keys, rnd):
    start, mu = state['params'], self.config.feddyn.mu
    state, loss = super().train(state, data, keys, rnd)
    old = jax.tree.map(lambda g, t, s: g - mu * (t - s), state['personal']['old_grad'],
                       state['params'], start)
    return {**state, 'personal': {'old_grad': old}}, loss

  def aggregate(self, state, agg_mask, weights, rnd):
    mu = self.config.feddyn.mu
    mean = lambda t: jax.tree.map(lambda x: x[0], aggregate.fedavg(t, weights))
    g_old, h = state['server']['global'], state['server']['h']
    delta = mean(jax.tree.map(jnp.subtract, state['params'], g_old))
    h = jax.tree.map(lambda hh, d: hh - mu * d, h, delta)
    new = jax.tree.map(lambda m, hh: m - hh[0] / mu, mean(state['params']), h)
    params = masks.stack(new, self.num_clients)
    state = {**state, 'params': params,
             'batch_stats': first_present(state['batch_stats'], weights),
             'server': {'h': h, 'global': params}}
    return state, local_fraction(state)
