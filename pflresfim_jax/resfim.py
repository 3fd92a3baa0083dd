"""Residual Fisher Information (ResFIM) and the local/shared partition (METHOD.md 3).

    R = |F_sim - F_orig|                          (residual='abs', default)
    R = |F_sim - F_orig| / (F_orig + eps)         (residual='relative')

``F_orig`` is the diagonal Fisher of the client's model on its own examples,
``F_sim`` on the same examples rendered in other clients' styles (spectral
transfer), with the same labels. BatchNorm runs in inference mode (running
statistics) and there is no dropout while estimating: a per-example vmap with
train-mode BN would normalise every example by itself and change the function.

Library use::

    R = resfim.estimate(params, batch, apply_fn=models.inference_fn(model),
                        model_state=batch_stats, bank=bank, bank_owner=owner,
                        client_id=0, key=key)
    local = resfim.partition(R, ratio=0.2)           # True = domain-sensitive
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

from pflresfim_jax import fisher, losses, masks, spectral

Array = jax.Array
PyTree = Any

RESIDUALS = ('abs', 'relative')


def residual(f_orig: PyTree, f_sim: PyTree, kind: str = 'abs', eps: float = 1e-8) -> PyTree:
  """ResFIM from two Fisher diagonals (pytrees of the same structure)."""
  if kind == 'abs':
    return jax.tree.map(lambda a, b: jnp.abs(b - a), f_orig, f_sim)
  if kind == 'relative':
    return jax.tree.map(lambda a, b: jnp.abs(b - a) / (a + eps), f_orig, f_sim)
  raise ValueError(f'resfim.residual must be one of {RESIDUALS}, got {kind!r}')


def estimate(params: PyTree, batch: Mapping[str, Array], *,
             apply_fn: Callable[[PyTree, PyTree, Array], Array],
             model_state: PyTree = None,
             key: Optional[Array] = None,
             bank: Optional[Array] = None,
             bank_owner: Optional[Array] = None,
             client_id=0,
             spectral_ratio: float = 0.01,
             lam_range: Tuple[float, float] = (0.0, 1.0),
             loss: str = 'nll',
             kind: str = 'abs',
             chunk_size: int = 1,
             eps: float = 1e-8,
             value_range: Optional[Tuple[float, float]] = (0.0, 1.0),
             unroll: bool = False) -> PyTree:
  """ResFIM of one client's model on one batch.

  Args:
    params: the model's trainable parameters.
    batch: dict with 'image' ``[N, H, W, C]`` and 'label' ``[N, H, W, 1]``; an
      optional 'mask' bool ``[N]`` marks real examples of a padded batch; an optional
      'sim_image' ``[N, H, W, C]`` supplies the simulated images directly (then the
      bank is not needed).
    apply_fn: ``apply_fn(params, model_state, images) -> logits [N, H, W, 1]`` in
      inference mode (see :func:`pflresfim_jax.models.inference_fn`).
    model_state: non-trainable state passed to ``apply_fn`` (BN running stats).
    key: PRNG key for :func:`spectral.simulate` (needed with a bank).
    bank, bank_owner: the shared amplitude windows ``[M, 2b+1, 2b+1, C]`` and their
      owners ``[M]``.
    client_id: this client's id in ``bank_owner``.
    spectral_ratio, lam_range: spectral transfer settings (config ``spectral.*``).
    loss: per-example loss, 'nll' (pixel-mean BCE) or 'train' (Dice+BCE).
    kind: 'abs' or 'relative' (config ``resfim.residual``).
    chunk_size: examples per vmapped gradient chunk (config ``fisher.chunk_size``).
    eps: the 'relative' residual's denominator offset.
    value_range: valid pixel range the simulated images are clipped to.
    unroll: unroll the Fisher chunk loop (see :func:`fisher.diagonal`).

  Returns:
    float32 pytree shaped like ``params``.
  """
  images, labels = batch['image'], batch['label']
  if 'sim_image' in batch:
    sim = batch['sim_image']
  elif bank is None or bank_owner is None or key is None:
    raise ValueError("resfim.estimate needs bank, bank_owner and key, or batch['sim_image']")
  else:
    sim = spectral.simulate(key, images, client_id, bank, bank_owner, spectral_ratio,
                            lam_range, value_range)
  per_image = losses.per_example(loss)

  def loss_fn(p, example):
    logits = apply_fn(p, model_state, example['image'][None])
    return per_image(logits[0], example['label'])

  mask = batch.get('mask')
  f_orig = fisher.diagonal(loss_fn, params, {'image': images, 'label': labels},
                           chunk_size, mask, unroll)
  f_sim = fisher.diagonal(loss_fn, params, {'image': sim, 'label': labels},
                          chunk_size, mask, unroll)
  return residual(f_orig, f_sim, kind, eps)


def partition(resfim: PyTree, ratio: float = 0.2, scope: str = 'tensor') -> PyTree:
  """Domain-sensitive entries: True = keep local (top ``ratio`` by ResFIM).

  See :func:`pflresfim_jax.masks.top_fraction` for 'tensor' / 'global' scope and the
  rounding and tie rules.
  """
  return masks.top_fraction(resfim, ratio, scope)
