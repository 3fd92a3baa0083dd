"""Empirical diagonal Fisher information from per-example gradients (METHOD.md 3).

``F = (1/N) sum_i g_i * g_i`` with ``g_i = grad_theta loss(theta; example_i)``,
computed with ``jax.vmap(jax.grad)`` over chunks of ``chunk_size`` examples inside a
``lax.scan``: peak memory is ``chunk_size x |theta|`` and the sum of squares is
accumulated chunk by chunk, never ``N x |theta|``.
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
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError('fisher.diagonal: empty batch')
  n = leaves[0].shape[0]
  chunk = max(1, min(int(chunk_size), n))
  num_chunks = -(-n // chunk)
  padded = num_chunks * chunk
  weight = jnp.ones((n,), jnp.float32) if example_mask is None else example_mask.astype(jnp.float32)
  weight = jnp.pad(weight, (0, padded - n))
  # Padded rows repeat example 0: any valid input, multiplied by weight 0 below.
  index = jnp.where(jnp.arange(padded) < n, jnp.arange(padded), 0)
  chunks = jax.tree.map(
      lambda x: jnp.take(x, index, axis=0).reshape(num_chunks, chunk, *x.shape[1:]), batch)
  weights = weight.reshape(num_chunks, chunk)
  per_example_grad = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))

  def body(acc, xs):
    examples, w = xs
    grads = per_example_grad(params, examples)
    acc = jax.tree.map(
        lambda a, g: a + jnp.tensordot(w, jnp.square(g.astype(jnp.float32)), axes=1),
        acc, grads)
    return acc, None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  total, _ = jax.lax.scan(body, zeros, (chunks, weights), unroll=num_chunks if unroll else 1)
  count = jnp.maximum(weight.sum(), 1.0)
  return jax.tree.map(lambda t: t / count, total)
