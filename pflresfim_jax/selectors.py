"""Which entries a client keeps local: ResFIM's residual and the ablations beside it.

pFL-ResFIM keeps local the top ``resfim.ratio`` of entries by the Fisher residual. To
test whether the residual is what matters, the same round can pick the same number of
entries by another score (config ``resfim.selector``)::

    'residual'  |F_sim - F_orig| (resfim.residual)        the method (default)
    'fisher'    F_orig: the Fisher on real data alone       is the style shift needed?
    'inverse'   the residual's LOWEST entries               does its ranking matter?
    'random'    uniform draws, a new set every estimate     is any split enough?
    'fedcac'    |(theta - theta_start) * theta|             FedCAC's sensitivity (no Fisher)

Every selector selects through :func:`pflresfim_jax.masks.top_fraction` at the same
``ratio`` and ``scope`` ('inverse' with ``lowest=True``), so only the ranking differs.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp

from pflresfim_jax import masks, resfim

PyTree = Any

SELECTORS = ('residual', 'fisher', 'inverse', 'random', 'fedcac')
NEEDS_FISHER = ('residual', 'fisher', 'inverse')


def select(selector: str, ratio: float, scope: str = 'tensor', *,
           fishers: Optional[Tuple[PyTree, PyTree]] = None, params: PyTree = None,
           start: PyTree = None, key: Optional[jax.Array] = None,
           residual: str = 'abs', eps: float = 1e-8) -> PyTree:
  """One client's local mask (bool like the parameters, True = keep local).

  Args:
    selector: one of :data:`SELECTORS`.
    ratio, scope: as :func:`pflresfim_jax.resfim.partition`.
    fishers: ``(F_orig, F_sim)`` from :func:`pflresfim_jax.resfim.fisher_pair`
      (selectors in :data:`NEEDS_FISHER`).
    params: the client's parameters after local training ('random': their shapes;
      'fedcac').
    start: the parameters it started the round from ('fedcac').
    key: PRNG key ('random').
    residual, eps: the residual's kind and offset (``resfim.residual``, ``resfim.eps``).
  """
  if selector not in SELECTORS:
    raise ValueError(f'resfim.selector must be one of {SELECTORS}, got {selector!r}')
  if selector in NEEDS_FISHER:
    if fishers is None:
      raise ValueError(f"resfim.selector={selector!r} needs the Fisher pair ('fishers')")
    f_orig, f_sim = fishers
    if selector == 'fisher':
      return masks.top_fraction(f_orig, ratio, scope)
    r = resfim.residual(f_orig, f_sim, residual, eps)
    return masks.top_fraction(r, ratio, scope, lowest=selector == 'inverse')
  if selector == 'random':
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    draws = [jax.random.uniform(k, x.shape) for k, x in zip(keys, leaves)]
    return masks.top_fraction(jax.tree.unflatten(treedef, draws), ratio, scope)
  return masks.top_fraction(update_score(params, start), ratio, scope)


def update_score(params: PyTree, start: PyTree) -> PyTree:
  """FedCAC's sensitivity ``|(theta - theta_start) * theta|`` (pytrees of one shape)."""
  return jax.tree.map(lambda new, old: jnp.abs((new - old) * new), params, start)
