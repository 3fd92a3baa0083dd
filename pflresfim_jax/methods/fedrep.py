"""FedRep (Collins et al., 2021): a local head, a shared body, trained in two phases.

Each round a client first trains only its head (``fedrep.head_epochs``), then only
its body (``local_epochs``); each phase has its own Adam whose other part is frozen
(``optax.multi_transform`` with ``set_to_zero``). The head stays local; the body is
averaged with METHOD.md 4's masked mean.
"""
from __future__ import annotations

import jax

from pflresfim_jax import masks, models
from pflresfim_jax.clients import engine
from pflresfim_jax.methods.base import Method


class FedRep(Method):
  def __init__(self, ctx):
    super().__init__(ctx)
    wd = self.config.weight_decay
    self.head_tx = engine.optimizer(wd, trainable=models.is_head)
    self.body_tx = engine.optimizer(wd, trainable=models.is_body)

  def init_client(self, key):
    state = super().init_client(key)
    params = state['params']
    return {**state, 'opt': {'head': self.head_tx.init(params), 'body': self.body_tx.init(params)}}

  def static_mask(self, params):
    return masks.head(params)

  def train(self, state, data, keys, rnd):
    lr, cfg = self.learning_rate(rnd), self.config
    head_step = engine.train_step(self.loss, self.head_tx)
    (p, s, o_head), _ = self.train_clients(
        head_step, (state['params'], state['batch_stats'], state['opt']['head']), None, data,
        keys, lr, cfg.fedrep.head_epochs)
    body_step = engine.train_step(self.loss, self.body_tx)
    body_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    (p, s, o_body), loss = self.train_clients(
        body_step, (p, s, state['opt']['body']), None, data, body_keys, lr, cfg.local_epochs)
    return {**state, 'params': p, 'batch_stats': s,
            'opt': {'head': o_head, 'body': o_body}}, loss
