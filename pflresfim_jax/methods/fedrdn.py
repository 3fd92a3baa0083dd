"""FedRDN (Yan et al., 2023): federated random domain normalization, as FL-MedSegBench.

Data-level: every client computes the per-channel mean and std of its training
images once, pooled over all their pixels (nodes.py ``compute_dataset_statistics``;
images in [0, 1]), and the server hands every client the list of all of them
(main_seg.py, before the round loop). Then (utils.py ``FedRDNTransform``):

train   each batch is normalised with the statistics of ONE client j drawn uniformly
        over all clients, itself included:  x' = (x - mean_j) / (std_j + 1e-8)
eval    x' = (x - mean_own) / (std_own + 1e-8)

Training and the server are otherwise FedAvg (parameters and BatchNorm statistics
averaged). The statistics travel in the style bank (``channel_mean``/``channel_std``
[R, C], one row per client that took part in the style exchange; :func:`bank_entries`),
only for a method whose contract asks for them (``Contract.channel_stats``). A client keeps its own statistics in
``personal`` (for its predictor; identity before its first round) and receives the
bank's each round in ``state['inbox']``.
"""
from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from pflresfim_jax.methods.base import Contract
from pflresfim_jax.methods.simple import FedAvg

EPS = 1e-8   # utils.py FedRDNTransform


def channel_stats(images: jax.Array, count) -> Dict[str, jax.Array]:
  """Pooled per-channel ``{'mean', 'std'}`` [C] of the first ``count`` of ``images``
  [N, H, W, C]: population std over every pixel of those images (0 when none)."""
  valid = (jnp.arange(images.shape[0]) < count)[:, None, None, None]
  n = jnp.maximum(count, 1) * images.shape[1] * images.shape[2]
  mean = jnp.sum(jnp.where(valid, images, 0.0), (0, 1, 2)) / n
  var = jnp.sum(jnp.where(valid, jnp.square(images - mean), 0.0), (0, 1, 2)) / n
  return {'mean': mean, 'std': jnp.sqrt(var)}


def normalize(images: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  """``(images - mean) / (std + 1e-8)`` per channel (last axis)."""
  return (images - mean) / (std + EPS)


def bank_entries(images: np.ndarray) -> Dict[str, np.ndarray]:
  """One client's row of the style bank: its statistics, ``[1, C]`` each."""
  s = _channel_stats(jnp.asarray(images), len(images))
  return {'channel_mean': np.asarray(s['mean'])[None], 'channel_std': np.asarray(s['std'])[None]}


_channel_stats = jax.jit(channel_stats)


class FedRDN(FedAvg):
  contract = Contract(batch_stats=True, channel_stats=True)

  def __init__(self, ctx):
    super().__init__(ctx)
    seg = self.loss

    def loss(params, stats, batch, mask, aux):
      j = jax.random.randint(batch['key'], (), 0, aux['mean'].shape[0])
      image = normalize(batch['image'], aux['mean'][j], aux['std'][j])
      return seg(params, stats, {**batch, 'image': image}, mask)
    self.loss = loss

  def init_client(self, key):
    state = super().init_client(key)
    c = self.ctx.image_shape[-1]
    return {**state, 'personal': {'mean': jnp.zeros(c), 'std': jnp.ones(c)}}

  def receive(self, state, train_data, bank, client_ids):
    """Own statistics from the client's data; every client's from the bank (R rows,
    drawn uniformly)."""
    own = jax.vmap(channel_stats)(train_data['image'], train_data['count'])
    inbox = {n: jnp.broadcast_to(bank['channel_' + n], (self.num_clients, *bank['channel_' + n].shape))
             for n in ('mean', 'std')}
    return {**state, 'personal': own, 'inbox': inbox}

  def loss_aux(self, state):
    return state['inbox']

  def predictor(self, params, batch_stats, personal):
    return lambda x: self.apply_eval(params, batch_stats,
                                     normalize(x, personal['mean'], personal['std']))
