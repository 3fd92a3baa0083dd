"""Residual Fisher Information (ResFIM): which parameters are domain-sensitive.

The three calls a federated loop needs (settings bound once, data passed each call)::

    estimate = resfim.estimator(model)             # a Flax module or apply_fn(variables, x)
    R = estimate(variables, batch)                 # pytree shaped like variables['params']
    local = resfim.partition(R, ratio=0.2)         # bool pytree, True = keep local
    new = aggregate.masked_mean(stacked_params, stacked_local)   # on the server

``batch`` holds the client's own data and the other clients' styles:

* 'image' ``[N, H, W, C]`` in [0, 1] and 'label' ``[N, H, W, 1]``;
* either 'sim_image' ``[N, H, W, C]`` (the same images already restyled), or
  'style' ``[M, 2b+1, 2b+1, C]`` (other clients' amplitude windows, from
  :func:`pflresfim_jax.spectral.amplitude_bank`) and 'key' (a PRNG key);
* optional 'mask' bool ``[N]`` (real examples of a padded batch), and 'style_owner'
  int ``[M]`` with 'client_id' (windows owned by ``client_id``, or by -1, are never
  drawn: for a bank that holds every client's windows).

One shot, with every setting at its default: ``resfim.estimate(variables, batch, model)``.

What it computes (METHOD.md 3)::

    R = |F_sim - F_orig|                          (residual='abs', default)
    R = |F_sim - F_orig| / (F_orig + eps)         (residual='relative')

``F_orig`` is the diagonal empirical Fisher of the model on the client's examples,
``F_sim`` on the same examples rendered in other clients' styles (spectral transfer,
:func:`pflresfim_jax.spectral.simulate`), with the same labels. The model runs in
inference mode (BatchNorm running statistics, no dropout): a per-example vmap with
train-mode BatchNorm would normalise every example by itself and change the function.
An nnx module goes through :func:`nnx_model`.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp
from flax import linen as nn

from pflresfim_jax import fisher, fisher_layers, losses, masks, spectral

Array = jax.Array
PyTree = Any
Estimate = Callable[[PyTree, Mapping[str, Array]], PyTree]
FisherPair = Callable[[PyTree, Mapping[str, Array]], Tuple[PyTree, PyTree]]

RESIDUALS = ('abs', 'relative')
GRADS = ('vmap', 'layers')
# Keyword arguments that put a linen module in inference mode, by the name its
# __call__ gives them: BatchNorm on running statistics, dropout off.
_INFERENCE_KWARGS = {'train': False, 'training': False, 'deterministic': True,
                     'use_running_average': True}


def estimator(model: Union[nn.Module, Callable[[PyTree, Array], Array]], *,
              loss: Union[str, Callable[[Array, Array], Array]] = 'nll',
              residual: str = 'abs', chunk_size: int = 1,
              spectral_ratio: float = 0.01, lam_range: Tuple[float, float] = (0.0, 1.0),
              value_range: Optional[Tuple[float, float]] = (0.0, 1.0),
              eps: float = 1e-8, unroll: bool = False,
              apply_kwargs: Optional[Mapping[str, Any]] = None, grads: str = 'vmap') -> Estimate:
  """Bind the settings once; returns a pure, jittable ``estimate(variables, batch)``.

  Args:
    model: a ``flax.linen.Module`` (applied in inference mode: a ``train`` /
      ``deterministic`` / ``use_running_average`` argument of its ``__call__`` is set
      accordingly), or ``apply_fn(variables, images [N,H,W,C]) -> logits [N,H,W,1]``
      (for an nnx module, see :func:`nnx_model`).
    loss: per-example loss ``loss(logits [H,W,1], label [H,W,1]) -> scalar``, or
      'nll' (pixel-mean BCE, config ``fisher.loss``) / 'train' (Dice + BCE).
    residual: 'abs' or 'relative' (config ``resfim.residual``).
    chunk_size: examples per vmapped gradient, or per batched pass with 'layers'
      (config ``fisher.chunk_size``; speed only).
    spectral_ratio: window ratio L the style windows were made with (``spectral.ratio``).
    lam_range: blend strength range ``(lam_min, lam_max)`` (``spectral.lam_*``).
    value_range: pixel range simulated images are clipped to, or None.
    eps: the 'relative' residual's denominator offset (``resfim.eps``).
    unroll: unroll the Fisher chunk loop (see :func:`fisher.diagonal`).
    apply_kwargs: extra keyword arguments for a linen module's ``apply`` (override
      the inference-mode defaults above).
    grads: how the per-example gradients are computed (config ``fisher.grads``; the
      same sums up to float rounding): 'vmap', ``jax.vmap(jax.grad)`` of any model;
      'layers', one batched backward pass per chunk for a linen model made of
      ``models.Conv`` / ``BatchNorm`` / ``PopulationNorm`` layers (fisher_layers.py).

  Returns:
    ``estimate(variables, batch) -> R``. ``variables`` is Flax's
    ``{'params': ..., 'batch_stats': ...}`` (collections other than 'params' are held
    fixed), or the parameters alone for a model without state; ``R`` is float32,
    shaped like the parameters. ``batch``: see the module docstring.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from pflresfim_jax import resfim
    >>> model = nn.Conv(1, (3, 3))
    >>> params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))['params']
    >>> batch = {'image': jnp.full((2, 8, 8, 3), 0.5), 'label': jnp.ones((2, 8, 8, 1)),
    ...          'sim_image': jnp.full((2, 8, 8, 3), 0.25)}
    >>> estimate = jax.jit(resfim.estimator(model))
    >>> jax.tree.map(jnp.shape, estimate(params, batch))
    {'bias': (1,), 'kernel': (3, 3, 3, 1)}
  """
  if residual not in RESIDUALS:
    raise ValueError(f'resfim.residual must be one of {RESIDUALS}, got {residual!r}')
  pair = fisher_pair(model, loss=loss, chunk_size=chunk_size, spectral_ratio=spectral_ratio,
                     lam_range=lam_range, value_range=value_range, unroll=unroll,
                     apply_kwargs=apply_kwargs, grads=grads)

  def estimate(variables: PyTree, batch: Mapping[str, Array]) -> PyTree:
    return _residual(*pair(variables, batch), residual, eps)
  return estimate


def fisher_pair(model: Union[nn.Module, Callable[[PyTree, Array], Array]], *,
                loss: Union[str, Callable[[Array, Array], Array]] = 'nll',
                chunk_size: int = 1, spectral_ratio: float = 0.01,
                lam_range: Tuple[float, float] = (0.0, 1.0),
                value_range: Optional[Tuple[float, float]] = (0.0, 1.0), unroll: bool = False,
                apply_kwargs: Optional[Mapping[str, Any]] = None, grads: str = 'vmap') -> FisherPair:
  """The two Fisher diagonals ResFIM compares, before the residual (for other selectors).

  Same arguments as :func:`estimator` (less ``residual`` and ``eps``).

  Returns:
    ``pair(variables, batch) -> (F_orig, F_sim)``: float32 pytrees shaped like the
    parameters; ``estimator(...)(v, b) == residual(*pair(v, b))``.
  """
  if not 0.0 <= spectral_ratio < 0.5:   # checked here, before anything is traced
    raise ValueError(f'spectral.ratio must be in [0, 0.5), got {spectral_ratio!r}')
  if grads not in GRADS:
    raise ValueError(f'fisher.grads must be one of {GRADS}, got {grads!r}')
  if grads == 'layers' and not isinstance(model, nn.Module):
    raise ValueError("fisher.grads='layers' needs a flax.linen model; use 'vmap'")
  apply_fn = _linen_apply(model, apply_kwargs) if isinstance(model, nn.Module) else model
  per_image = losses.per_example(loss) if isinstance(loss, str) else loss

  def pair(variables: PyTree, batch: Mapping[str, Array]) -> Tuple[PyTree, PyTree]:
    with_state = _has_state(variables)
    params = variables['params'] if with_state else variables

    def loss_fn(p, example):
      v = {**variables, 'params': p} if with_state else p
      return per_image(apply_fn(v, example['image'][None])[0], example['label'])

    images, labels, mask = batch['image'], batch['label'], batch.get('mask')
    sim = _simulated(batch, spectral_ratio, lam_range, value_range)
    both = {'image': jnp.stack([images, sim]), 'label': jnp.stack([labels, labels])}
    both_mask = None if mask is None else jnp.stack([mask, mask])
    if grads == 'layers':
      squares = fisher_layers.squares_fn(model, _linen_variables(variables), per_image,
                                         _inference_kwargs(model, apply_kwargs))
      f = fisher.accumulate(squares, params, both, chunk_size, both_mask, unroll)
    else:
      f = fisher.diagonals(loss_fn, params, both, chunk_size, both_mask, unroll)
    return jax.tree.map(lambda x: x[0], f), jax.tree.map(lambda x: x[1], f)
  return pair


def estimate(variables: PyTree, batch: Mapping[str, Array], model, **settings) -> PyTree:
  """One-shot ``estimator(model, **settings)(variables, batch)``.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from pflresfim_jax import resfim, spectral
    >>> model = nn.Conv(1, (3, 3))
    >>> params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))['params']
    >>> images = jax.random.uniform(jax.random.PRNGKey(1), (4, 16, 16, 3))
    >>> others = spectral.amplitude_bank(images[::-1], ratio=0.1)   # other clients' styles
    >>> batch = {'image': images, 'label': (images[..., :1] > 0.5).astype(jnp.float32),
    ...          'style': others, 'key': jax.random.PRNGKey(2)}
    >>> R = resfim.estimate(params, batch, model, spectral_ratio=0.1)
    >>> resfim.partition(R, ratio=0.2)['kernel'].sum()   # ceil(0.2 * 27) entries local
    Array(6, dtype=int32)
  """
  return estimator(model, **settings)(variables, batch)


def partition(resfim: PyTree, ratio: float = 0.2, scope: str = 'tensor') -> PyTree:
  """Domain-sensitive entries: True = keep local (the top ``ratio`` by ResFIM).

  'tensor' scope ranks within every tensor, 'global' over all entries after
  dividing each tensor by its mean; see :func:`pflresfim_jax.masks.top_fraction`
  for the rounding (``ceil``) and tie rules.

  Example:
    >>> import jax.numpy as jnp
    >>> from pflresfim_jax import resfim
    >>> resfim.partition({'w': jnp.array([0.1, 0.9, 0.3, 0.2, 0.0])}, ratio=0.4)
    {'w': Array([False,  True,  True, False, False], dtype=bool)}
  """
  return masks.top_fraction(resfim, ratio, scope)


def residual(f_orig: PyTree, f_sim: PyTree, kind: str = 'abs', eps: float = 1e-8) -> PyTree:
  """ResFIM from two Fisher diagonals (pytrees of the same structure).

  Example:
    >>> import jax.numpy as jnp
    >>> from pflresfim_jax import resfim
    >>> resfim.residual({'w': jnp.array([1.0, 2.0])}, {'w': jnp.array([1.5, 2.0])})
    {'w': Array([0.5, 0. ], dtype=float32)}
  """
  if kind == 'abs':
    return jax.tree.map(lambda a, b: jnp.abs(b - a), f_orig, f_sim)
  if kind == 'relative':
    return jax.tree.map(lambda a, b: jnp.abs(b - a) / (a + eps), f_orig, f_sim)
  raise ValueError(f'resfim.residual must be one of {RESIDUALS}, got {kind!r}')


_residual = residual   # estimator's keyword of the same name hides the function


def nnx_model(module) -> Tuple[Callable[[PyTree, Array], Array], PyTree]:
  """Adapter for a ``flax.nnx`` module: ``(apply_fn, variables)`` for :func:`estimator`.

  The module is put in eval mode (BatchNorm on running statistics, dropout off) and
  split into its parameters (``nnx.Param``) and the rest; ``variables`` is
  ``{'params': nnx.State, 'rest': nnx.State}`` and R is shaped like its 'params'.
  After training, call it again for the module's current values.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from pflresfim_jax import resfim
    >>> apply_fn, variables = resfim.nnx_model(nnx.Conv(3, 1, (3, 3), rngs=nnx.Rngs(0)))
    >>> batch = {'image': jnp.full((2, 8, 8, 3), 0.5), 'label': jnp.ones((2, 8, 8, 1)),
    ...          'sim_image': jnp.full((2, 8, 8, 3), 0.25)}
    >>> R = resfim.estimator(apply_fn)(variables, batch)
    >>> R['kernel'].shape
    (3, 3, 3, 1)
  """
  from flax import nnx   # only for nnx users
  module.eval()
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  def apply_fn(variables, images):
    return nnx.merge(graphdef, variables['params'], variables['rest'])(images)
  return apply_fn, {'params': params, 'rest': rest}


def _inference_kwargs(module: nn.Module, apply_kwargs: Optional[Mapping[str, Any]]) -> dict:
  """The keyword arguments that put ``module`` in inference mode, then ``apply_kwargs``."""
  accepted = inspect.signature(type(module).__call__).parameters
  kwargs = {k: v for k, v in _INFERENCE_KWARGS.items() if k in accepted}
  kwargs.update(apply_kwargs or {})
  return kwargs


def _linen_apply(module: nn.Module, apply_kwargs: Optional[Mapping[str, Any]]):
  """``apply_fn(variables, images)`` of a linen module in inference mode."""
  kwargs = _inference_kwargs(module, apply_kwargs)

  def apply_fn(variables, images):
    return module.apply(_linen_variables(variables), images, **kwargs)
  return apply_fn


def _has_state(variables: PyTree) -> bool:
  """Flax variables ``{'params': ..., other collections}`` rather than bare parameters."""
  return isinstance(variables, Mapping) and 'params' in variables


def _linen_variables(variables: PyTree) -> PyTree:
  """``variables`` as a linen module's ``apply`` takes them (bare parameters wrapped)."""
  return variables if _has_state(variables) else {'params': variables}


def _simulated(batch: Mapping[str, Array], ratio: float, lam_range, value_range) -> Array:
  """The batch's images in other clients' styles: 'sim_image', or drawn from 'style'."""
  if 'sim_image' in batch:
    return batch['sim_image']
  if 'style' not in batch or 'key' not in batch:
    raise ValueError("resfim: the batch needs 'sim_image', or 'style' (other clients' "
                     f"amplitude windows) and 'key'; it has {sorted(batch)}")
  style = batch['style']
  owner = batch.get('style_owner')
  if owner is None:   # every window is another client's
    owner, client_id = jnp.zeros(style.shape[:1], jnp.int32), -1
  else:
    client_id = batch.get('client_id', -1)
  return spectral.simulate(batch['key'], batch['image'], client_id, style, owner, ratio,
                           lam_range, value_range)
