"""Per-example squared gradients of a linen model from one batched backward pass.

``fisher.grads='layers'``: the same ``sum_i w_i g_i ** 2`` as ``jax.vmap(jax.grad)``
(fisher.py) for a model whose parameters all belong to :class:`models.Conv`,
:class:`models.BatchNorm` or :class:`models.PopulationNorm` layers run in inference
mode, where examples do not interact. One forward and backward pass of the whole
chunk gives every layer's input ``x_i`` and output gradient ``dy_i`` per example
(``nn.intercept_methods`` records the inputs and adds a zero to every output, whose
gradient is ``dy``), and each layer's per-example parameter gradients are then
written out:

* Conv (stride 1, 'SAME', k x k): ``dkernel_i[a, b] = sum_hw xpad_i[h + a, w + b] dy_i[h, w]``
  (an ``einsum`` per window offset), ``dbias_i = sum_hw dy_i``;
* BatchNorm with running statistics: ``dscale_i = sum_hw dy_i (x_i - mean) /
  sqrt(var + eps)``, ``dbias_i = sum_hw dy_i``;
* PopulationNorm: the same with ``pop_mean``/``pop_gamma``, and their gradients.

Autodiff's per-example loop runs the weight gradients as one small convolution per
example; here they are batched matrix products, and the activations' backward pass
runs at the chunk's batch size. The sums are the same up to float rounding
(tests/test_fisher_layers.py compares with ``jax.vmap(jax.grad)``).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from pflresfim_jax import models

Array = jax.Array
PyTree = Any
LAYERS = (models.Conv, models.BatchNorm, models.PopulationNorm)


def squares_fn(module: nn.Module, variables: PyTree, per_image: Callable[[Array, Array], Array],
               apply_kwargs: Mapping[str, Any]) -> Callable[[Mapping[str, Array], Array], PyTree]:
  """``squares(chunk, weights)`` for :func:`pflresfim_jax.fisher.accumulate`.

  Args:
    module: the linen model (float32 compute).
    variables: its variables ('params', and 'batch_stats' for BatchNorm).
    per_image: ``per_image(logits [H, W, C], label [H, W, 1]) -> scalar`` loss.
    apply_kwargs: keyword arguments of ``module.apply`` (inference mode).

  Returns:
    ``squares({'image': [B, H, W, C], 'label': [B, H, W, 1]}, weights [B]) -> pytree
    like variables['params']``: ``sum_i weights[i] * g_i ** 2``, float32.

  Raises:
    ValueError (when traced): a parameter outside these layers, or a layer computing in
    another dtype than float32.
  """
  def squares(chunk, weights):
    inputs, grads = _inputs_and_output_grads(module, variables, per_image, apply_kwargs, chunk)
    per_layer: Dict[Tuple[str, ...], Dict[str, Array]] = {}
    for key, (layer, x) in inputs.items():
      path = key[0]
      g = _layer_grads(layer, x, grads[key], variables, path)
      old = per_layer.setdefault(path, {})
      for name, v in g.items():   # a layer called twice: its gradients add up
        old[name] = old[name] + v if name in old else v
    flat = {path + (name,): jnp.tensordot(weights, jnp.square(v), axes=1)
            for path, g in per_layer.items() for name, v in g.items()}
    params = traverse_util.flatten_dict(variables['params'])
    missing = sorted('/'.join(k) for k in params if k not in flat)
    if missing:
      raise ValueError(f"fisher.grads='layers' covers the parameters of {[c.__name__ for c in LAYERS]} "
                       f"only; not {missing[:5]}: use fisher.grads='vmap'")
    return traverse_util.unflatten_dict({k: flat[k] for k in params})
  return squares


def _inputs_and_output_grads(module, variables, per_image, apply_kwargs, chunk):
  """Every layer call's (layer, input) and the loss's gradient at its output, keyed by
  (module path, call number)."""
  shapes, layers = {}, {}

  def forward(zeros):
    seen = {}

    def intercept(next_fun, args, kwargs, context):
      layer = context.module
      if context.method_name != '__call__' or not isinstance(layer, LAYERS):
        return next_fun(*args, **kwargs)
      if jnp.dtype(layer.dtype) != jnp.float32:
        raise ValueError(f"fisher.grads='layers' needs float32 layers, {layer.path} computes "
                         f"in {jnp.dtype(layer.dtype).name}: use fisher.grads='vmap'")
      key = (layer.path, sum(k[0] == layer.path for k in seen))
      y = next_fun(*args, **kwargs)
      seen[key], shapes[key], layers[key] = args[0], jax.ShapeDtypeStruct(y.shape, y.dtype), layer
      return y if zeros is None else y + zeros[key]
    with nn.intercept_methods(intercept):
      logits = module.apply(variables, chunk['image'], **apply_kwargs)
    # Examples do not interact: the gradient of the sum is each example's own.
    return jnp.sum(jax.vmap(per_image)(logits, chunk['label'])), seen

  jax.eval_shape(lambda: forward(None))   # the outputs' shapes
  zeros = {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}
  (_, seen), grads = jax.value_and_grad(forward, has_aux=True)(zeros)
  return {k: (layers[k], x) for k, x in seen.items()}, grads


def _layer_grads(layer, x: Array, dy: Array, variables, path) -> Dict[str, Array]:
  """One layer's per-example parameter gradients ``{name: [B, *shape]}``."""
  x, dy = x.astype(jnp.float32), dy.astype(jnp.float32)
  sum_hw = lambda a: jnp.sum(a, axis=(1, 2))
  if isinstance(layer, models.Conv):
    k, (h, w) = layer.kernel, x.shape[1:3]
    lo, hi = models.same_pad(k)
    xp = jnp.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)))
    kernel = jnp.stack([jnp.stack([jnp.einsum('bhwi,bhwo->bio', xp[:, a:a + h, c:c + w], dy)
                                   for c in range(k)], 1) for a in range(k)], 1)
    return {'kernel': kernel, 'bias': sum_hw(dy)}
  params = _at(variables['params'], path)
  if isinstance(layer, models.BatchNorm):
    stats = _at(variables['batch_stats'], path)
    xhat = (x - stats['mean']) * jax.lax.rsqrt(stats['var'] + layer.epsilon)
    return {'scale': sum_hw(dy * xhat), 'bias': sum_hw(dy)}
  inv = 1.0 / jnp.sqrt(params['pop_gamma'] + layer.epsilon)   # PopulationNorm
  centred = x - params['pop_mean']
  return {'scale': sum_hw(dy * centred * inv), 'bias': sum_hw(dy),
          'pop_mean': sum_hw(dy) * (-params['scale'] * inv),
          'pop_gamma': sum_hw(dy * centred) * (-0.5 * params['scale'] * inv ** 3)}


def _at(tree: Mapping, path: Tuple[str, ...]) -> Mapping:
  for name in path:
    tree = tree[name]
  return tree
