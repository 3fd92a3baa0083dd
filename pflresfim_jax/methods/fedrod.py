"""FedRoD (Chen & Chao, 2022): a shared body + generic head, and a personal head.

The model (body and generic head) is trained on the segmentation loss and averaged
as in SiloBN (BatchNorm statistics local). A personal head, a 1x1 convolution on the
last decoder feature, adds its logits to the generic ones; it is trained on the same
loss with the generic path held fixed (stop_gradient) and never leaves the client.
One Adam covers both.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pflresfim_jax import losses, models
from pflresfim_jax.clients import engine
from pflresfim_jax.methods.base import Method


def personal_head(phead, feature: jax.Array) -> jax.Array:
  """``feature [N,H,W,C] -> logits [N,H,W,1]``: a 1x1 convolution."""
  return jnp.einsum('nhwc,co->nhwo', feature, phead['kernel']) + phead['bias']


class FedRoD(Method):
  def init_client(self, key):
    state = super().init_client(key)
    params = state['params']
    width = params[models.HEAD]['kernel'].shape[-2]
    phead = {'kernel': jnp.zeros((width, 1), jnp.float32), 'bias': jnp.zeros((1,), jnp.float32)}
    personal = {'params': phead, 'opt': self.tx.init({'model': params, 'phead': phead})}
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
    step = engine.train_step(self.rod_loss, self.tx)
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
