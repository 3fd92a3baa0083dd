"""MOON (Li et al., 2021): FedAvg with a model-contrastive term on the local loss.

As FL-MedSegBench (client_funct_seg.py ``client_moon``; main_seg.py keeps
``pre_model``): each batch, the last decoder feature map ``z`` of the model in training
is flattened per image and pulled towards the same images' features under the global
model received this round, ``z_g``, and pushed from those under the client's own model
of the previous round (after its local training, before aggregation), ``z_p``; both in
inference mode, without gradient:

    l_con = -log( e^{cos(z, z_g)/t} / (e^{cos(z, z_g)/t} + e^{cos(z, z_p)/t}) )
    loss  = Dice+BCE + moon.mu * mean over the batch's images of l_con

``moon.mu`` = 0.01 and ``moon.temperature`` t = 0.5 are the reference's. The server is
FedAvg (BatchNorm statistics averaged). The previous model is ``personal['prev']``
(params and BatchNorm statistics): it never leaves the client. In round 0 it is the
initial model, so z_g = z_p and the term is the constant log 2.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pflresfim_jax import losses
from pflresfim_jax.methods.simple import FedAvg


def cosine(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Cosine similarity of rows ``[N, D]`` (torch.nn.CosineSimilarity: norms clamped by eps)."""
  na = jnp.maximum(jnp.linalg.norm(a, axis=-1), eps)
  nb = jnp.maximum(jnp.linalg.norm(b, axis=-1), eps)
  return jnp.sum(a * b, axis=-1) / (na * nb)


def contrastive(z: jax.Array, z_global: jax.Array, z_prev: jax.Array, temperature: float
                ) -> jax.Array:
  """Per-image MOON loss ``[N]`` from features ``[N, ...]`` (flattened per image)."""
  flat = lambda x: x.reshape(x.shape[0], -1)
  z, z_global, z_prev = flat(z), flat(z_global), flat(z_prev)
  pos = cosine(z, z_global) / temperature
  neg = cosine(z, z_prev) / temperature
  return jnp.logaddexp(pos, neg) - pos


class MOON(FedAvg):
  def __init__(self, ctx):
    super().__init__(ctx)
    model, mu, t = self.model, self.config.moon.mu, self.config.moon.temperature

    def features(params, stats, x):
      _, feat = model.apply({'params': params, 'batch_stats': stats}, x, train=False,
                            features=True)
      return jax.lax.stop_gradient(feat)

    def loss(params, stats, batch, mask, aux):
      (logits, feat), updates = model.apply(
          {'params': params, 'batch_stats': stats}, batch['image'], train=True, mask=mask,
          features=True, mutable=['batch_stats'])
      z_g = features(aux['global']['params'], aux['global']['batch_stats'], batch['image'])
      z_p = features(aux['prev']['params'], aux['prev']['batch_stats'], batch['image'])
      con = losses.masked_mean(contrastive(feat, z_g, z_p, t), mask)
      return losses.dice_bce_loss(logits, batch['label'], mask) + mu * con, updates['batch_stats']
    self.loss = loss

  def init_client(self, key):
    state = super().init_client(key)
    prev = {'params': state['params'], 'batch_stats': state['batch_stats']}
    return {**state, 'personal': {'prev': prev}}

  def loss_aux(self, state):
    received = {'params': state['params'], 'batch_stats': state['batch_stats']}
    return {'global': received, 'prev': state['personal']['prev']}

  def train(self, state, data, keys, rnd):
    state, loss = super().train(state, data, keys, rnd)
    prev = {'params': state['params'], 'batch_stats': state['batch_stats']}
    return {**state, 'personal': {'prev': prev}}, loss
