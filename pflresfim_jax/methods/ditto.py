"""Ditto (Li et al., 2021): a FedAvg global model and a personal model pulled towards it.

Each round a client trains its copy of the global model (averaged with its BatchNorm
statistics, as FedAvg), then its personal model v with the proximal term
``ditto.mu/2 * ||v - w||^2`` to the global model w it received this round, at the rate
``ditto.lr`` (scaled by the round schedule). Clients predict with v, which never
leaves them.
"""
from __future__ import annotations

import jax

from pflresfim_jax.clients import engine
from pflresfim_jax.methods.fedprox import proximal
from pflresfim_jax.methods.simple import FedAvg


class Ditto(FedAvg):
  def __init__(self, ctx):
    super().__init__(ctx)
    self.personal_loss = proximal(self.loss, self.config.ditto.mu)

  def init_client(self, key):
    state = super().init_client(key)
    params = state['params']
    personal = {'params': params, 'batch_stats': state['batch_stats'], 'opt': self.tx.init(params)}
    return {**state, 'personal': personal}

  def train(self, state, data, keys, rnd):
    cfg, mine, received = self.config, state['personal'], state['params']
    state, _ = super().train(state, data, keys, rnd)
    step = engine.train_step(self.personal_loss, self.tx)
    v_keys = jax.vmap(lambda k: jax.random.fold_in(k, 2))(keys)
    lr = self.learning_rate(rnd) * cfg.ditto.lr / cfg.lr
    (vp, vs, vo), loss = self.train_clients(
        step, (mine['params'], mine['batch_stats'], mine['opt']), received, data, v_keys,
        lr, cfg.local_epochs)
    return {**state, 'personal': {'params': vp, 'batch_stats': vs, 'opt': vo}}, loss

  def predictor(self, params, batch_stats, personal):
    return lambda x: self.apply_eval(personal['params'], personal['batch_stats'], x)
