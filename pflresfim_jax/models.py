"""Segmentation networks (Flax linen) and the parameter-path vocabulary of the baselines.

``UNet2D`` is the reference network of METHOD.md 5 (base 16, 3 input channels:
3,184,721 parameters). Parameters are plain pytrees: ``model.init`` /
``model.apply``; the federated code stacks them along a leading client axis.

Naming, which the path masks of the baselines rely on:

* every conv+BN pair is a ``ConvBN`` module with children ``conv`` and ``bn``;
  BatchNorm scale/bias therefore live under a key ``'bn'``;
* the 1x1 output convolution is ``'head'``; everything else is the body.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

HEAD = 'head'
BN = 'bn'

# Kaiming-normal, fan_out, ReLU gain (torch's kaiming_normal_(mode='fan_out')).
kaiming_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

BIAS_INITS = ('torch', 'zeros')


def conv_bias_init(kind: str, fan_in: int):
  """Initialiser of a conv bias ``[features]``.

  'torch': uniform in +-1/sqrt(fan_in), fan_in = in_channels * kh * kw, torch.nn.Conv2d's
  default (the reference UNet2D re-initialises only the kernels); 'zeros': flax's default.
  """
  if kind == 'zeros':
    return nn.initializers.zeros
  if kind != 'torch':
    raise ValueError(f'model.bias_init must be one of {BIAS_INITS}, got {kind!r}')
  bound = 1.0 / float(fan_in) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


CONVS = ('xla', 'im2col', 'canonical')


class Conv(nn.Module):
  """A stride-1 'SAME' convolution with bias, parameters as ``nn.Conv``'s ('kernel'
  ``[k, k, Cin, F]``, 'bias' ``[F]``), computed one of two ways (``impl``):

  * 'xla': ``lax.conv_general_dilated`` (nn.Conv);
  * 'im2col': the k*k shifted copies of the padded input side by side, ``[N, H, W,
    k*k*Cin]``, times the kernel as a ``[k*k*Cin, F]`` matrix: one matrix product,
    whose gradients are matrix products too. The same sums in another order;
  * 'canonical': the 'xla' convolution with its two gradients written out
    (:func:`conv_same`) as convolutions in the canonical NHWC x HWIO layout.

  XLA:CPU runs a convolution on its fast (Eigen) kernels only in that layout. It puts
  autodiff's gradient convolutions in it in straight-line code but not inside loops
  (``lax.map`` over clients, ``lax.scan`` over steps or Fisher chunks), where they fall
  back to a naive loop nest 5-40x slower; 'canonical' and 'im2col' avoid that, and
  'canonical' gives the 'xla' numbers (README, Benchmark).
  """
  features: int
  kernel: int = 3
  impl: str = 'xla'
  dtype: Any = jnp.float32
  kernel_init: Callable = kaiming_fan_out
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k, cin = self.kernel, x.shape[-1]
    w = self.param('kernel', self.kernel_init, (k, k, cin, self.features), jnp.float32)
    b = self.param('bias', self.bias_init, (self.features,), jnp.float32)
    x, w, b = (a.astype(self.dtype) for a in (x, w, b))
    if self.impl == 'xla':
      y = _conv(x, w, same_pad(k))
    elif self.impl == 'im2col':
      y = jnp.dot(im2col(x, k), w.reshape(k * k * cin, self.features))
    elif self.impl == 'canonical':
      y = conv_same(x, w)
    else:
      raise ValueError(f'model.conv must be one of {CONVS}, got {self.impl!r}')
    return y + b


_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _conv(x: Array, w: Array, pad: Tuple[int, int]) -> Array:
  """Stride-1 convolution ``[N, H, W, C] x [kh, kw, C, F]``, ``pad`` (low, high) on
  both spatial axes."""
  return jax.lax.conv_general_dilated(x, w, (1, 1), (pad, pad), dimension_numbers=_NHWC)


def same_pad(k: int) -> Tuple[int, int]:
  """(low, high) padding that keeps the size under a stride-1 ``k``-wide convolution:
  centred for an odd ``k`` (the UNet's 3 and 1); an even ``k``'s extra pixel goes low
  (XLA's 'SAME' puts it high). Every ``Conv`` impl and fisher_layers.py pad this way."""
  return k // 2, k - 1 - k // 2


@jax.custom_vjp
def conv_same(x: Array, w: Array) -> Array:
  """Stride-1 'SAME' convolution ``x [N, H, W, C]``, ``w [k, k, C, F]`` -> ``[N, H, W,
  F]``, as ``lax.conv_general_dilated``, with hand-written gradients that stay in the
  NHWC x HWIO layout: the input gradient is ``g`` convolved with the flipped kernel
  ``[k, k, F, C]``; the weight gradient is a convolution whose batch is C, features N
  and F, and whose window is the whole ``H x W`` of ``g``. Reverse mode only (a
  ``custom_vjp``: ``grad`` and ``vmap`` of it, to any order; not ``jvp``/``jacfwd``,
  for which ``model.conv='xla'`` is the same function)."""
  return _conv(x, w, same_pad(w.shape[0]))


def _conv_same_fwd(x, w):
  return conv_same(x, w), (x, w)


def _conv_same_bwd(res, g):
  x, w = res
  lo, hi = same_pad(w.shape[0])
  dx = _conv(g, jnp.swapaxes(w[::-1, ::-1], 2, 3), (hi, lo))
  xp = jnp.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)))
  dw = _conv(jnp.transpose(xp, (3, 1, 2, 0)), jnp.transpose(g, (1, 2, 0, 3)), (0, 0))
  return dx, jnp.transpose(dw, (1, 2, 0, 3)).astype(w.dtype)


conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)


def im2col(x: Array, k: int) -> Array:
  """``[N, H, W, C] -> [N, H, W, k*k*C]``: each pixel's k x k 'SAME' neighbourhood
  (zero padded), row-major over the window then channels (the HWIO kernel's order)."""
  if k == 1:
    return x
  p, (h, w) = k // 2, x.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (p, k - 1 - p), (p, k - 1 - p), (0, 0)))
  return jnp.concatenate([xp[:, i:i + h, j:j + w] for i in range(k) for j in range(k)], -1)


class BatchNorm(nn.Module):
  """torch.nn.BatchNorm2d over the last axis of ``x [N, H, W, C]``, with an example mask.

  Training normalises with the batch's biased variance and moves the running statistics
  by ``1 - momentum`` towards the batch mean and, when ``unbiased``, the unbiased
  variance ``v * n / (n - 1)`` (n = real examples * H * W), as torch does; flax's
  nn.BatchNorm tracks the biased one (``unbiased=False`` gives that). ``mask`` (bool,
  broadcastable to ``[N, 1, 1, 1]``) excludes padded examples from the statistics.
  Parameters ``scale``/``bias`` and statistics ``mean``/``var`` are float32, as in flax.
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  unbiased: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool, mask: Optional[Array] = None) -> Array:
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (c,), jnp.float32)
    x32 = x.astype(jnp.float32)
    if train:
      w = jnp.ones(x.shape[:1] + (1,) * (x.ndim - 1), jnp.float32) if mask is None \
          else jnp.broadcast_to(mask, x.shape[:1] + (1,) * (x.ndim - 1)).astype(jnp.float32)
      axes = tuple(range(x.ndim - 1))
      n = jnp.sum(w) * (x.size // (x.shape[0] * c))
      mean = jnp.sum(x32 * w, axes) / jnp.maximum(n, 1.0)
      var = jnp.sum(jnp.square(x32 - mean) * w, axes) / jnp.maximum(n, 1.0)
      if not self.is_initializing():
        track = var * n / jnp.maximum(n - 1.0, 1.0) if self.unbiased else var
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * track
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (x32 - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.astype(self.dtype)


class PopulationNorm(nn.Module):
  """Population Normalization (FL-MedSegBench models_dict/unet2d.py
  ``PopulationNormalization``): the batch is normalised, in training as in inference,
  by a learned per-channel mean ``pop_mean`` (init 0) and variance ``pop_gamma`` (init
  1), then scaled and shifted: ``(x - pop_mean) / sqrt(pop_gamma + eps) * scale + bias``.
  No batch statistics enter the output; the reference's running mean/var buffers, which
  nothing reads, are not kept. ``train`` and ``mask`` are accepted for BatchNorm's call.
  """
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False, mask: Optional[Array] = None) -> Array:
    del train, mask
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    mean = self.param('pop_mean', nn.initializers.zeros, (c,), jnp.float32)
    var = self.param('pop_gamma', nn.initializers.ones, (c,), jnp.float32)
    y = (x.astype(jnp.float32) - mean) / jnp.sqrt(var + self.epsilon) * scale + bias
    return y.astype(self.dtype)


NORMS = ('bn', 'pn')


class ConvBN(nn.Module):
  """conv (with bias) -> BatchNorm (or PopulationNorm: ``norm='pn'``) -> optional ReLU.

  Either normalisation is the child named ``'bn'``."""
  features: int
  kernel: int = 3
  relu: bool = True
  dtype: Any = jnp.float32
  bias_init: str = 'torch'
  bn_unbiased: bool = True
  norm: str = 'bn'
  conv: str = 'xla'

  @nn.compact
  def __call__(self, x: Array, train: bool, mask: Optional[Array] = None) -> Array:
    fan_in = x.shape[-1] * self.kernel * self.kernel
    x = Conv(self.features, self.kernel, self.conv, self.dtype, kaiming_fan_out,
             conv_bias_init(self.bias_init, fan_in), name='conv')(x)
    # Statistics and normalisation in float32 whatever the compute dtype.
    if self.norm == 'pn':
      x = PopulationNorm(epsilon=1e-5, dtype=self.dtype, name=BN)(x)
    elif self.norm == 'bn':
      x = BatchNorm(momentum=0.9, epsilon=1e-5, unbiased=self.bn_unbiased, dtype=self.dtype,
                    name=BN)(x, train, mask)
    else:
      raise ValueError(f'UNet2D norm must be one of {NORMS}, got {self.norm!r}')
    return nn.relu(x) if self.relu else x


def _upsample2(x: Array) -> Array:
  """Nearest-neighbour 2x upsampling of [N, H, W, C]."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _maxpool2(x: Array) -> Array:
  return nn.max_pool(x, (2, 2), strides=(2, 2))


class UNet2D(nn.Module):
  """The benchmark UNet (METHOD.md 5).

  Attributes:
    base: channel width ``n`` of the first level (reference: 16).
    out_channels: logits per pixel (1 for binary segmentation).
    dtype: compute dtype (``jnp.bfloat16`` for mixed precision; parameters stay
      float32).
    levels: resolution levels (reference: 5, four poolings); fewer make a smaller
      network that compiles faster (the tests use 3).
    bias_init: conv biases, 'torch' (the reference) or 'zeros' (:func:`conv_bias_init`).
    bn_unbiased: BatchNorm tracks the unbiased batch variance (torch) or the biased one.
    norm: 'bn' (BatchNorm, the reference) or 'pn' (:class:`PopulationNorm`, the PN method).
    conv: how convolutions are computed, 'xla' or 'im2col' (:class:`Conv`; the same
      parameters and function).

  Call: ``apply(variables, x [N, H, W, Cin], train, mask=None, features=False)``
  returns logits ``[N, H, W, out]`` (and the last decoder feature map
  ``[N, H, W, 2n]`` when ``features=True``). ``mask`` (bool ``[N]``) marks the real
  examples of a padded batch: padded ones never enter BatchNorm statistics.
  H and W must be divisible by ``2 ** (levels - 1)`` (16 for the reference).
  """
  base: int = 16
  out_channels: int = 1
  dtype: Any = jnp.float32
  levels: int = 5
  bias_init: str = 'torch'
  bn_unbiased: bool = True
  norm: str = 'bn'
  conv: str = 'xla'

  @nn.compact
  def __call__(self, x: Array, train: bool = False, mask: Optional[Array] = None,
               features: bool = False):
    n, depth = self.base, self.levels
    if not 2 <= depth <= 5:
      raise ValueError(f'UNet2D levels must be 2..5 (5 is the reference), got {depth}')
    if x.shape[1] % 2 ** (depth - 1) or x.shape[2] % 2 ** (depth - 1):
      raise ValueError(f'UNet2D with {depth} levels needs H and W divisible by '
                       f'{2 ** (depth - 1)}, got {x.shape[1:3]}')
    bmask = None if mask is None else mask.reshape(-1, 1, 1, 1)
    block = lambda f, name, k=3, relu=True: ConvBN(f, k, relu, self.dtype, self.bias_init,
                                                   self.bn_unbiased, self.norm, self.conv,
                                                   name=name)
    x = x.astype(self.dtype)
    widths = [n * 2 ** i for i in range(depth)]         # reference: n, 2n, 4n, 8n, 16n
    skips = []
    for level, width in enumerate(widths, start=1):
      if level > 1:
        x = _maxpool2(x)
      x = block(width, f'enc{level}_0', relu=False)(x, train, bmask)
      x = block(width, f'enc{level}_1')(x, train, bmask)
      x = block(width, f'enc{level}_2')(x, train, bmask)
      skips.append(x)
    for i, width in enumerate(reversed(widths[1:])):
      name = f'dec{i + 1}'
      if i > 0:
        x = block(width, f'{name}_in')(x, train, bmask)
      x = _upsample2(x)
      x = block(width // 2, f'{name}_up', k=1)(x, train, bmask)
      x = jnp.concatenate([skips[depth - 2 - i], x], axis=-1)
      x = block(width, f'{name}_out')(x, train, bmask)
    feat = x
    logits = Conv(self.out_channels, 1, self.conv, self.dtype, kaiming_fan_out,
                  conv_bias_init(self.bias_init, feat.shape[-1]), name=HEAD)(feat)
    logits = logits.astype(jnp.float32)
    return (logits, feat.astype(jnp.float32)) if features else logits


def count_params(params) -> int:
  """Number of scalar parameters in a pytree."""
  return int(sum(x.size for x in jax.tree.leaves(params)))


def init(model: nn.Module, key: Array, image_shape: Sequence[int]):
  """Initialise ``model`` for images ``[H, W, C]``.

  Returns:
    ``(params, batch_stats)``: two pytrees (``batch_stats`` is ``{}`` for a model
    without BatchNorm).
  """
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, *image_shape), jnp.float32),
                                           train=False))(key)
  return variables['params'], variables.get('batch_stats', {})


def inference_fn(model: nn.Module) -> Callable[[Any, Any, Array], Array]:
  """``apply_fn(params, batch_stats, images [N,H,W,C]) -> logits [N,H,W,1]``.

  BatchNorm uses its running statistics (inference mode): the function the Fisher
  information is measured on.
  """
  def apply_fn(params, batch_stats, images):
    return model.apply({'params': params, 'batch_stats': batch_stats}, images, train=False)
  return apply_fn


# ----------------------------------------------------------------------------
# Path predicates: which leaves are head / BatchNorm / body.

def path_keys(path) -> Tuple[str, ...]:
  """A pytree key path as a tuple of strings."""
  out = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
    else:
      out.append(str(k))
  return tuple(out)


def is_head(path) -> bool:
  """True for the output convolution's kernel and bias."""
  return HEAD in path_keys(path)


def is_bn(path) -> bool:
  """True for BatchNorm scale and bias."""
  return BN in path_keys(path)


def is_body(path) -> bool:
  return not is_head(path)
