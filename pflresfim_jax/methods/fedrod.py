"""FedRoD (Chen & Chao, 2022): a shared body + generic head, and a personal head.

As FL-MedSegBench runs it (nodes.py: ``p_head = copy.deepcopy(model.seg1)``;
client_funct_seg.py ``client_fedrod``; server_funct.py 'fedavg'): the model (body and
generic head) is trained on the segmentation loss with Adam and averaged as in FedAvg,
BatchNorm statistics included. A personal head, a 1x1 convolution on the last decoder
feature that starts as a copy of the generic head, adds its logits to the generic ones;
it is trained on the same loss with the generic path held fixed (stop_gradient), by
plain SGD at the round's learning rate, and never leaves the client.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from pflresfim_jax import losses, models
from pflresfim_jax.clients import engine
from pflresfim_jax.methods.base import Contract, Method


def personal_head(phead, feature: jax.Array) -> jax.Array:
  """``feature [N,H,W,C] -> logits [N,H,W,1]``: a 1x1 convolution."""
  return jnp.einsum('nhwc,co->nhwo', feature, phead['kernel']) + phead['bias']


class FedRoD(Method):
  contract = Contract(batch_stats=True)

  def __init__(self, ctx):
    super().__init__(ctx)
    wd = self.config.weight_decay

    def make(learning_rate):   # Adam (+ L2) on the model, plain SGD on the personal head
      return optax.multi_transform(
          {'model': engine.adam_l2(learning_rate, wd), 'phead': optax.sgd(learning_rate)},
          lambda both: {'model': jax.tree.map(lambda _: 'model', both['model']),
                        'phead': jax.tree.map(lambda _: 'phead', both['phead'])})
    self.rod_tx = optax.inject_hyperparams(make)(learning_rate=0.0)

  def init_client(self, key):
    state = super().init_client(key)
    params = state['params']
    head = params[models.HEAD]
    phead = {'kernel': head['kernel'].reshape(-1, head['kernel'].shape[-1]), 'bias': head['bias']}
    personal = {'params': phead, 'opt': self.rod_tx.init({'model': params, 'phead': phead})}
    return {**state, 'opt': {}, 'personal': personal}

  def rod_loss(self, both, stats, batch, mask, aux):
    (logits, feature), upd = self.model.apply(
        {'params': both['model'], 'batch_stats': stats}, batch['image'], train=True, mask=mask,
        features=True, mutable=['batch_stats'])
    generic = losses.dice_bce_loss(logits, batch['label'], mask)
    personal_logits = jax.lax.stop_gradient(logits) + personal_head(
        both['phead'], jax.lax.stop_gradient(feature))
    personal = losses.dice_bce_loss(personal_logits, batch['label'], mask)
    return generic + personal, upd['batch_stats']

  def train(self, state, data, keys, rnd):
    step = engine.train_step(self.rod_loss, self.rod_tx)
    both = {'model': state['params'], 'phead': state['personal']['params']}
    (both, s, o), loss = self.train_clients(step, (both, state['batch_stats'],
                                                   state['personal']['opt']),
                                            None, data, keys, self.learning_rate(rnd),
                                            self.config.local_epochs)
    return {**state, 'params': both['model'], 'batch_stats': s,
            'personal': {'params': both['phead'], 'opt': o}}, loss

  def predictor(self, params, batch_stats, personal):
    def predict(x):
      logits, feature = self.model.apply({'params': params, 'batch_stats': batch_stats}, x,
                                         train=False, features=True)
      return logits + personal_head(personal['params'], feature)
    return predict
