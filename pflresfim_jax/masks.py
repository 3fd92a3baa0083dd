"""Boolean parameter masks (True = keep local, False = aggregate).

Path masks for the baselines (head, BatchNorm, body) and score-based masks: the
top fraction of entries by a score, per tensor or globally (ResFIM, FedCAC). All
masks are pytrees of bool arrays shaped like the parameters; stacked masks carry a
leading client axis.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from pflresfim_jax import models

Array = jax.Array
PyTree = Any

SCOPES = ('tensor', 'global')


def by_path(params: PyTree, predicate: Callable[[Any], bool]) -> PyTree:
  """Mask that is True on the whole leaf wherever ``predicate(path)`` holds."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.full(x.shape, bool(predicate(path))), params)


def constant(params: PyTree, value: bool) -> PyTree:
  return jax.tree.map(lambda x: jnp.full(x.shape, value), params)


def head(params: PyTree) -> PyTree:
  """The output layer (FedPer, FedRep)."""
  return by_path(params, models.is_head)


def body(params: PyTree) -> PyTree:
  """Everything but the output layer (LG-FedAvg)."""
  return by_path(params, models.is_body)


def batchnorm(params: PyTree) -> PyTree:
  """BatchNorm scale and bias (FedBN)."""
  return by_path(params, models.is_bn)


def top_k_count(size: int, ratio: float) -> int:
  """Entries selected from ``size`` at fraction ``ratio``: ``ceil(ratio * size)``.

  Rounding up means any ``ratio > 0`` selects at least one entry of every tensor;
  the tiny slack keeps e.g. ``0.2 * 10`` from becoming 3 by float error.
  """
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f'ratio must be in [0, 1], got {ratio!r}')
  return min(size, int(math.ceil(ratio * size - 1e-9)))


def _top_k_flat(scores: Array, k: int) -> Array:
  """Bool mask of the k largest entries of 1-D ``scores``; ties go to lower index, NaN
  ranks last, -0.0 ties with 0.0 (the order of a stable ``argsort(-scores)``).

  Without sorting (XLA:CPU sorts about 4 million floats a second): the k-th largest
  score is found bit by bit on order-preserving uint32 keys (32 counting passes), then
  the entries above it are taken and as many of the entries equal to it, in index
  order, as are still missing.
  """
  if k == 0:
    return jnp.zeros(scores.shape, bool)
  key = _sortable_key(scores)

  def set_bit(i, t):
    candidate = t | jnp.left_shift(jnp.uint32(1), (31 - i).astype(jnp.uint32))
    return jnp.where(jnp.sum(key >= candidate) >= k, candidate, t)
  kth = jax.lax.fori_loop(0, 32, set_bit, jnp.uint32(0))
  above, tied = key > kth, key == kth
  return above | (tied & (jnp.cumsum(tied) <= k - jnp.sum(above)))


def _sortable_key(scores: Array) -> Array:
  """float ``[n]`` -> uint32 ``[n]`` in the same order (NaN as -inf, -0.0 as 0.0)."""
  s = jnp.where(jnp.isnan(scores), -jnp.inf, scores).astype(jnp.float32)
  s = jnp.where(s == 0, jnp.float32(0), s)
  bits = jax.lax.bitcast_convert_type(s, jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


@functools.partial(jax.jit, static_argnames=('ratio', 'scope', 'eps', 'lowest'))
def top_fraction(scores: PyTree, ratio: float, scope: str = 'tensor',
                 eps: float = 1e-12, lowest: bool = False) -> PyTree:
  """Mask of the top ``ratio`` fraction of entries by score.

  Args:
    scores: pytree of float arrays (no client axis; vmap for stacked scores).
    ratio: fraction in ``[0, 1]``.
    scope: 'tensor': ``ceil(ratio * size)`` entries within every leaf; 'global':
      ``ceil(ratio * total)`` entries over all leaves after dividing each leaf by
      its mean (so layers of different scale compete fairly).
    eps: added to each leaf's mean in 'global' scope.
    lowest: select the ``ratio`` fraction with the LOWEST (normalised) scores instead.

  Returns:
    bool pytree shaped like ``scores``. Ties are broken by position (earlier
    leaf, then lower flat index), so the result is deterministic.
  """
  sign = -1.0 if lowest else 1.0
  if scope == 'tensor':
    return jax.tree.map(
        lambda s: _top_k_flat(sign * s.ravel(), top_k_count(s.size, ratio)).reshape(s.shape),
        scores)
  if scope == 'global':
    leaves, treedef = jax.tree.flatten(scores)
    flat = jnp.concatenate([(sign * s / (jnp.mean(s) + eps)).ravel() for s in leaves])
    picked = _top_k_flat(flat, top_k_count(flat.size, ratio))
    out, start = [], 0
    for s in leaves:
      out.append(picked[start:start + s.size].reshape(s.shape))
      start += s.size
    return jax.tree.unflatten(treedef, out)
  raise ValueError(f'resfim.scope must be one of {SCOPES}, got {scope!r}')


def fraction_true(mask: PyTree) -> Array:
  """Fraction of True entries over a whole mask pytree (stacked: over everything)."""
  leaves = jax.tree.leaves(mask)
  return sum(m.sum() for m in leaves) / sum(m.size for m in leaves)


def overlap(stacked: PyTree) -> Array:
  """``[K, K]`` float32: entry (i, j) = |m_i and m_j| / |m_i| (0 where m_i is empty).

  Args:
    stacked: bool pytree with a leading client axis ``K``.

  One ``[K, P]`` int8 matrix of all tensors, multiplied with an int32 result: exact
  counts, and with the client axis sharded over devices, one all-gather of 1 byte per
  entry (not one of 4 bytes per entry for each parameter tensor).
  """
  leaves = jax.tree.leaves(stacked)
  k = leaves[0].shape[0]
  flat = jnp.concatenate([m.reshape(k, -1).astype(jnp.int8) for m in leaves], 1)
  both = jnp.matmul(flat, flat.T, preferred_element_type=jnp.int32).astype(jnp.float32)
  size = jnp.sum(flat, 1, dtype=jnp.int32).astype(jnp.float32)[:, None]   # the diagonal, locally
  return jnp.where(size > 0, both / jnp.maximum(size, 1.0), 0.0)


def kept(previous: PyTree, current: PyTree) -> Array:
  """``[K]``: the fraction of each client's current local entries that were local before
  (``|prev and cur| / |cur|``, 0 where cur is empty). Both stacked bool pytrees."""
  leaves = jax.tree.leaves(jax.tree.map(jnp.logical_and, previous, current))
  k = leaves[0].shape[0]
  both = sum(m.reshape(k, -1).sum(1) for m in leaves)
  size = sum(m.reshape(k, -1).sum(1) for m in jax.tree.leaves(current))
  return jnp.where(size > 0, both / jnp.maximum(size, 1), 0.0).astype(jnp.float32)


def module_fractions(mask: PyTree) -> dict:
  """Fraction of True entries per module (a layer's kernel, bias, scale together).

  Args:
    mask: bool pytree without a client axis (vmap it for stacked masks).

  Returns:
    ``{'enc0/conv1': fraction, ...}``: module path (the leaf path without its last
    key, joined by '/') -> scalar float32, in the order modules first appear.
  """
  counts = {}
  for path, m in jax.tree_util.tree_flatten_with_path(mask)[0]:
    name = '/'.join(models.path_keys(path)[:-1]) or '/'.join(models.path_keys(path))
    true, size = counts.get(name, (0, 0))
    counts[name] = (true + jnp.sum(m), size + m.size)
  return {n: (t / s).astype(jnp.float32) for n, (t, s) in counts.items()}


def stack(tree: PyTree, num_clients: int) -> PyTree:
  """Broadcast an unstacked pytree (a mask, a client's state) to ``[K, ...]``."""
  return jax.tree.map(lambda m: jnp.broadcast_to(m, (num_clients, *m.shape)), tree)
