"""Empirical diagonal Fisher information from per-example gradients (METHOD.md 3).

``F = (1/N) sum_i g_i * g_i`` with ``g_i = grad_theta loss(theta; example_i)``,
computed with ``jax.vmap(jax.grad)`` over chunks of ``chunk_size`` examples inside a
loop: peak memory is ``chunk_size x |theta|`` and the sum of squares is accumulated
chunk by chunk, never ``N x |theta|``. Chunks after a batch's last real example (its
``example_mask``) are not computed, unless the loop is unrolled.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = Any


def diagonal(loss_fn: Callable[[PyTree, Mapping[str, Array]], Array], params: PyTree,
             batch: Mapping[str, Array], chunk_size: int = 1,
             example_mask: Optional[Array] = None, unroll: bool = False) -> PyTree:
  """Diagonal empirical Fisher of ``loss_fn`` at ``params``.

  Args:
    loss_fn: ``loss_fn(params, example) -> scalar`` for ONE example: ``example`` is
      ``batch`` with its leading axis removed.
    params: pytree of float arrays.
    batch: dict of arrays sharing a leading example axis ``N``.
    chunk_size: examples per vmapped gradient evaluation (a chunk that does not
      divide ``N`` is padded; padded examples carry zero weight).
    example_mask: optional bool ``[N]``; only True examples count, and ``N`` in the
      mean becomes their number (0 examples gives zeros).
    unroll: unroll the loop over chunks (see ``clients.engine.resolve_unroll``).

  Returns:
    float32 pytree shaped like ``params``.
  """
  batches = jax.tree.map(lambda x: x[None], batch)
  mask = None if example_mask is None else example_mask[None]
  return jax.tree.map(lambda f: f[0], diagonals(loss_fn, params, batches, chunk_size, mask, unroll))


def diagonals(loss_fn: Callable[[PyTree, Mapping[str, Array]], Array], params: PyTree,
              batches: Mapping[str, Array], chunk_size: int = 1,
              example_mask: Optional[Array] = None, unroll: bool = False) -> PyTree:
  """``G`` diagonal Fishers of the same ``loss_fn`` at the same ``params``, one loop.

  ``diagonals(f, p, b)[g] == diagonal(f, p, b[g])`` (the same sums in the same order),
  with the per-example gradient traced once for all ``G`` batches (ResFIM's F_orig
  and F_sim).

  Args:
    loss_fn, params, chunk_size, unroll: as :func:`diagonal`.
    batches: dict of arrays sharing leading axes ``[G, N]``.
    example_mask: optional bool ``[G, N]`` (per batch, as in :func:`diagonal`).

  Returns:
    float32 pytree shaped like ``params`` with a leading axis ``G``.
  """
  per_example_grad = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))

  def squares(chunk, weights):   # sum_i w_i grad_i^2 over one chunk
    grads = per_example_grad(params, chunk)
    return jax.tree.map(
        lambda g: jnp.tensordot(weights, jnp.square(g.astype(jnp.float32)), axes=1), grads)
  return accumulate(squares, params, batches, chunk_size, example_mask, unroll)


def accumulate(squares: Callable[[Mapping[str, Array], Array], PyTree], like: PyTree,
               batches: Mapping[str, Array], chunk_size: int = 1,
               example_mask: Optional[Array] = None, unroll: bool = False) -> PyTree:
  """The chunk loop of :func:`diagonals` around any per-chunk sum of squared gradients.

  Args:
    squares: ``squares(chunk, weights) -> pytree like like``: ``sum_i weights[i] *
      g_i ** 2`` (float32) over the chunk's examples (``chunk``: ``batches`` without
      the ``G`` axis, ``[chunk_size, ...]``; ``weights``: float32 ``[chunk_size]``,
      0 for padding).
    like: pytree of arrays whose shapes the result takes (the parameters).
    batches, chunk_size, example_mask, unroll: as :func:`diagonals`.

  Returns:
    float32 pytree shaped like ``like`` with a leading axis ``G``: each batch's sum
    divided by its number of examples (as :func:`diagonals`).
  """
  leaves = jax.tree.leaves(batches)
  if not leaves:
    raise ValueError('fisher.diagonal: empty batch')
  g, n = leaves[0].shape[:2]
  chunk = max(1, min(int(chunk_size), n))
  num_chunks = -(-n // chunk)
  padded = num_chunks * chunk
  weight = (jnp.ones((g, n), jnp.float32) if example_mask is None
            else example_mask.astype(jnp.float32))
  weight = jnp.pad(weight, ((0, 0), (0, padded - n)))
  # Padded rows repeat example 0: any valid input, multiplied by weight 0 below.
  index = jnp.where(jnp.arange(padded) < n, jnp.arange(padded), 0)
  # Steps run batch by batch (all of batch 0's chunks, then batch 1's, ...).
  chunks = jax.tree.map(lambda x: jnp.take(x, index, axis=1).reshape(
      g * num_chunks, chunk, *x.shape[2:]), batches)
  weights = weight.reshape(g * num_chunks, chunk)

  def add(acc, t, k):   # acc[k] += sum_i w_i grad_i^2 over chunk t (of batch k), in place
    sums = squares(jax.tree.map(lambda x: x[t], chunks), weights[t])

    def one(a, s):
      row = jax.lax.dynamic_index_in_dim(a, k, keepdims=False)
      return jax.lax.dynamic_update_index_in_dim(a, row + s, k, 0)
    return jax.tree.map(one, acc, sums)

  zeros = jax.tree.map(lambda p: jnp.zeros((g, *p.shape), jnp.float32), like)
  if unroll:
    total = zeros
    for t in range(g * num_chunks):
      total = add(total, t, t // num_chunks)
  else:
    # Batch k's chunks up to its last real example; chunks of padding are skipped.
    last = jnp.max(jnp.where(weight > 0, jnp.arange(1, padded + 1), 0), axis=1)
    used = -(-last // chunk)
    total = jax.lax.fori_loop(0, g, lambda k, acc: jax.lax.fori_loop(
        0, used[k], lambda c, a: add(a, k * num_chunks + c, k), acc), zeros)
  count = jnp.maximum(weight.sum(axis=1), 1.0)
  return jax.tree.map(lambda t: t / count.reshape((g,) + (1,) * (t.ndim - 1)), total)
