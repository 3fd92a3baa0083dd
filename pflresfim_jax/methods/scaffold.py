"""SCAFFOLD (Karimireddy et al., 2020) as FL-MedSegBench runs it.

Client (client_funct_seg.py ``client_scaffold`` with utils.py ``ScaffoldOptimizer``, and
the control update in ``Client_update``): plain SGD at the round's learning rate, no
momentum and no weight decay, on the corrected gradient ``g + c - c_i``; after E epochs
of ``tau`` batches each

    c_i <- c_i - c + (x - y) / (E * tau * lr)      (x: the model before, y: after)

Server ('scaffold' in server_funct.py ``Server_update``): the global model moves by the
unweighted mean of the clients' updates, ``g + mean_j (y_j - g)`` (= the unweighted mean
of the models, as every client starts from g), BatchNorm statistics their unweighted
mean. The server control ``c`` moves by the mean of the clients' ``delta_control``,
which the reference computes as ``c_i - c_i`` = 0: c stays 0, and so it is 0 here.
``c_i`` lives in ``personal['control']`` (never sent).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from pflresfim_jax.methods.simple import FedAvg


class Scaffold(FedAvg):
  def __init__(self, ctx):
    super().__init__(ctx)
    self.tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.0)
    seg = self.loss

    def loss(params, stats, batch, mask, control):
      # Gradient g - c_i (c = 0), value unchanged: the dot product minus itself held constant.
      value, new_stats = seg(params, stats, batch, mask)
      dot = optax.tree_utils.tree_vdot(params, control)
      return value - (dot - jax.lax.stop_gradient(dot)), new_stats
    self.loss = loss

  def init_client(self, key):
    state = super().init_client(key)
    return {**state, 'personal': {'control': jax.tree.map(jnp.zeros_like, state['params'])}}

  def loss_aux(self, state):
    return state['personal']['control']

  def train(self, state, data, keys, rnd):
    start, cfg = state['params'], self.config
    state, loss = super().train(state, data, keys, rnd)
    steps = cfg.local_epochs * jnp.ceil(data['count'] / cfg.batch_size)        # [K]
    scale = 1.0 / jnp.maximum(steps * self.learning_rate(rnd), 1e-30)
    per_client = lambda x: scale.reshape((-1,) + (1,) * (x.ndim - 1))
    control = jax.tree.map(lambda c, x, y: c + (x - y) * per_client(c),
                           state['personal']['control'], start, state['params'])
    return {**state, 'personal': {'control': control}}, loss

  def aggregate(self, state, agg_mask, weights, rnd):
    return super().aggregate(state, agg_mask, (weights > 0).astype(jnp.float32), rnd)
