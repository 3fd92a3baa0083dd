"""Server aggregation over stacked client pytrees (METHOD.md 4).

Per entry, with client params ``theta[k]``, local masks ``m[k]`` (True = keep
local) and weights ``w[k]``:

    g = sum_k w_k (1 - m_k) theta_k / sum_k w_k (1 - m_k)
    theta_k <- m_k * theta_k + (1 - m_k) * g      (theta_k where the denominator is 0)

Pure functions, leading client axis, no loop over clients: inside jit with a
sharded client axis the sums become all-reduces.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = Any


WEIGHTS = ('batches', 'examples')


def client_weights(counts: Array, batch_size: int, rule: str = 'batches') -> Array:
  """Aggregation weights ``[K]`` float32 from training-set sizes ``counts [K]``.

  'batches': ``ceil(count / batch_size)``, the batches per epoch, which is what
  FL-MedSegBench's Server_update weighs by (main_seg.py: ``len(train_loader)``);
  'examples': ``count``, the training examples (METHOD.md 4). A client with no data
  weighs 0 either way.
  """
  counts = jnp.asarray(counts)
  if rule == 'examples':
    return counts.astype(jnp.float32)
  if rule != 'batches':
    raise ValueError(f'aggregate_weights must be one of {WEIGHTS}, got {rule!r}')
  return jnp.ceil(counts.astype(jnp.float32) / float(batch_size))


def _weights_like(weights: Array, x: Array) -> Array:
  return weights.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))


def masked_mean(stacked_params: PyTree, local_mask: PyTree,
                weights: Optional[Array] = None) -> PyTree:
  """METHOD.md 4's rule.

  Args:
    stacked_params: pytree of ``[K, ...]`` arrays.
    local_mask: bool pytree, each leaf broadcastable to its parameter leaf
      (``[K, ...]`` per client, or ``[...]`` shared by all clients).
    weights: ``[K]`` client weights (client_weights; 0 = absent client);
      None: equal weights.

  Returns:
    The new stacked params (same structure, shapes and dtypes).

  Example:
    >>> import jax.numpy as jnp
    >>> from pflresfim_jax import aggregate
    >>> theta = {'w': jnp.array([[1.0, 10.0], [3.0, 20.0]])}        # 2 clients
    >>> local = {'w': jnp.array([[False, True], [False, False]])}    # client 0 keeps w[1]
    >>> aggregate.masked_mean(theta, local)['w']
    Array([[ 2., 10.],
           [ 2., 20.]], dtype=float32)
  """
  if weights is None:
    weights = jnp.ones(jax.tree.leaves(stacked_params)[0].shape[:1], jnp.float32)

  def leaf(theta, mask):
    mask = jnp.broadcast_to(mask, theta.shape)
    share = _weights_like(weights, theta) * (~mask)
    num = jnp.sum(share * theta.astype(jnp.float32), axis=0, keepdims=True)
    den = jnp.sum(share, axis=0, keepdims=True)
    g = num / jnp.where(den > 0, den, 1.0)
    new = jnp.where(mask | (den <= 0), theta.astype(jnp.float32), g)
    return new.astype(theta.dtype)
  return jax.tree.map(leaf, stacked_params, local_mask)


def fedavg(stacked_params: PyTree, weights: Array) -> PyTree:
  """Weighted mean over clients, broadcast back to every client (nothing local)."""
  def leaf(theta):
    w = _weights_like(weights, theta)
    g = jnp.sum(w * theta.astype(jnp.float32), axis=0) / jnp.maximum(jnp.sum(weights), 1e-12)
    return jnp.broadcast_to(g, theta.shape).astype(theta.dtype)
  return jax.tree.map(leaf, stacked_params)


def group_mean(stacked_params: PyTree, adjacency: Array, weights: Array) -> PyTree:
  """Per-client weighted mean over a client's collaborators.

  ``out[k] = sum_j A[k, j] w_j theta_j / sum_j A[k, j] w_j`` (theta_k if the sum of
  weights is 0). Used by FedCAC for its critical entries.

  Args:
    stacked_params: pytree of ``[K, ...]``.
    adjacency: bool/float ``[K, K]``; row k = the clients k averages with.
    weights: ``[K]``.
  """
  a = adjacency.astype(jnp.float32) * weights.astype(jnp.float32)[None, :]
  den = a.sum(1)

  def leaf(theta):
    num = jnp.tensordot(a, theta.astype(jnp.float32), axes=1)
    d = den.reshape((-1,) + (1,) * (theta.ndim - 1))
    out = jnp.where(d > 0, num / jnp.where(d > 0, d, 1.0), theta.astype(jnp.float32))
    return out.astype(theta.dtype)
  return jax.tree.map(leaf, stacked_params)
