"""FedAWA (Shi et al., 2025): aggregation weights learned on the server from the client vectors.

As FL-MedSegBench (server_funct.py ``Server_update``, 'fedawa', with main_seg.py's
defaults: ``server_optimizer='adam'``, ``server_epochs=1``, ``reg_distance='cos'``).
The server keeps logits ``T [K]`` (round 0: the normalised aggregation weights
themselves) and the last global model g. Each round, over the parameters (BatchNorm
statistics excluded) flattened into vectors theta_k and g, with p = softmax(T):

    reg = sum_k p_k (1 - cos(g, theta_k))
    sim = sum_k p_k || (theta_k - g) - sum_j p_j (theta_j - g) ||_2

one step of a fresh Adam (lr ``fedawa.lr`` = 1e-3, betas 0.5 / 0.999) on T against
reg + sim; the models, BatchNorm statistics included, are averaged with the p of
before that step (the reference aggregates with the ``probability_train`` it computed
for the step). Every client continues from that mean.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from pflresfim_jax import aggregate, masks
from pflresfim_jax.methods.base import local_fraction
from pflresfim_jax.methods.simple import FedAvg


def flat_clients(stacked) -> jax.Array:
  """``[K, N]``: each client's leaves flattened and concatenated."""
  return jnp.concatenate([x.reshape(x.shape[0], -1) for x in jax.tree.leaves(stacked)], axis=1)


def objective(logits: jax.Array, thetas: jax.Array, g: jax.Array, present: jax.Array) -> jax.Array:
  """reg + sim of the module docstring; ``thetas [K, N]``, ``g [N]``, ``present [K]`` bool."""
  p = jax.nn.softmax(jnp.where(present, logits, -jnp.inf))
  cos = thetas @ g / jnp.maximum(jnp.linalg.norm(thetas, axis=1) * jnp.linalg.norm(g), 1e-8)
  reg = jnp.sum(p * (1.0 - cos))
  delta = thetas - g
  spread = jnp.linalg.norm(delta - p @ delta, axis=1)
  return reg + jnp.sum(p * spread)


class FedAWA(FedAvg):
  def server_init(self, client):
    # Round 0 starts T from the size weights, which the server has only then: a flag.
    return {'logits': jnp.zeros((self.num_clients,), jnp.float32),
            'started': jnp.zeros((), bool), 'global': client['params']}

  def aggregate(self, state, agg_mask, weights, rnd):
    server, present = state['server'], weights > 0
    first = jax.tree.map(lambda x: x[0], server)
    logits = jnp.where(first['started'], first['logits'],
                       weights / jnp.maximum(jnp.sum(weights), 1e-12))
    thetas = flat_clients(state['params'])
    g = flat_clients(jax.tree.map(lambda x: x[:1], server['global']))[0]
    p = jax.nn.softmax(jnp.where(present, logits, -jnp.inf))
    grad = jax.grad(objective)(logits, thetas, g, present)
    adam = optax.adam(self.config.fedawa.lr, b1=0.5, b2=0.999)
    updates, _ = adam.update(grad, adam.init(logits))
    logits = optax.apply_updates(logits, updates)
    # temp / sum(probability_train), as the reference divides.
    params, stats = aggregate.fedavg(state['params'], p), aggregate.fedavg(state['batch_stats'], p)
    new_server = {'logits': logits, 'started': jnp.ones((), bool),
                  'global': jax.tree.map(lambda x: x[0], params)}
    state = {**state, 'params': params, 'batch_stats': stats,
             'server': masks.stack(new_server, self.num_clients)}
    return state, local_fraction(state)
