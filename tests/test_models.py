import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pflresfim_jax import models
from helpers import assert_tree_close, sum_rtol

pytestmark = pytest.mark.reference


def test_reference_parameter_count():
  model = models.UNet2D(base=16)
  shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False),
                          jax.random.PRNGKey(0))
  assert models.count_params(shapes['params']) == 3_184_721


def test_output_shape_and_features():
  model = models.UNet2D(base=2)
  params, stats = models.init(model, jax.random.PRNGKey(0), (32, 16, 3))
  x = jnp.ones((3, 32, 16, 3))
  logits, feat = jax.jit(lambda v, x: model.apply(v, x, features=True))(
      {'params': params, 'batch_stats': stats}, x)
  assert logits.shape == (3, 32, 16, 1) and feat.shape == (3, 32, 16, 4)
  with pytest.raises(ValueError, match='divisible by 16'):
    model.apply({'params': params, 'batch_stats': stats}, jnp.ones((1, 20, 16, 3)))


@pytest.mark.parametrize('levels', [2, 3, 4])
def test_fewer_levels_are_the_reference_unet_cut_short(levels):
  """``levels`` L keeps the reference's first L encoder levels and their decoder steps,
  with the same names and widths, and needs H, W divisible by 2^(L-1)."""
  shape = lambda m: jax.eval_shape(lambda k: m.init(k, jnp.zeros((1, 16, 16, 3))),
                                   jax.random.PRNGKey(0))['params']
  full, cut = shape(models.UNet2D(base=2)), shape(models.UNet2D(base=2, levels=levels))
  want = {k for k in full if not k.startswith(('enc', 'dec')) or
          (k.startswith('enc') and int(k[3]) <= levels) or
          (k.startswith('dec') and int(k[3]) > 5 - levels)}
  # The kept decoder steps are the reference's last L-1, renumbered from 1; the first
  # of them starts from the deepest encoder level, so without an '_in' block.
  renamed = {f'dec{int(k[3]) - (5 - levels)}{k[4:]}' if k.startswith('dec') else k for k in want}
  assert set(cut) == renamed - {'dec1_in'}
  for k in cut:
    ref = k if not k.startswith('dec') else f'dec{int(k[3]) + 5 - levels}{k[4:]}'
    assert jax.tree.map(lambda a: a.shape, cut[k]) == jax.tree.map(lambda a: a.shape, full[ref]), k
  model = models.UNet2D(base=2, levels=levels)
  step = 2 ** (levels - 1)
  params, stats = models.init(model, jax.random.PRNGKey(0), (3 * step, 5 * step, 3))
  out = model.apply({'params': params, 'batch_stats': stats}, jnp.ones((1, 3 * step, 5 * step, 3)))
  assert out.shape == (1, 3 * step, 5 * step, 1)
  with pytest.raises(ValueError, match=f'divisible by {step}'):
    model.apply({'params': params, 'batch_stats': stats}, jnp.ones((1, 2 * step + 1, step, 3)))
  with pytest.raises(ValueError, match='levels must be 2..5'):
    models.UNet2D(base=2, levels=6).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))


def test_bn_stats_update_only_in_train_mode():
  model = models.UNet2D(base=2)
  params, stats = models.init(model, jax.random.PRNGKey(0), (16, 16, 3))
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 16, 16, 3))
  variables = {'params': params, 'batch_stats': stats}
  apply = jax.jit(lambda v, x, train: model.apply(v, x, train=train, mutable=['batch_stats']),
                  static_argnums=2)
  _, new = apply(variables, x, True)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), stats, new['batch_stats'])
  assert all(jax.tree.leaves(changed))
  _, same = apply(variables, x, False)
  jax.tree.map(np.testing.assert_array_equal, stats, same['batch_stats'])


def test_bn_mask_excludes_padded_examples():
  model = models.UNet2D(base=2)
  params, stats = models.init(model, jax.random.PRNGKey(0), (16, 16, 3))
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 16, 16, 3))
  variables = {'params': params, 'batch_stats': stats}
  apply = jax.jit(lambda v, x, m: model.apply(v, x, train=True, mask=m, mutable=['batch_stats']))
  real, s_real = apply(variables, x[:2], None)
  padded = x.at[2:].set(7.0)
  out, s_pad = apply(variables, padded, jnp.array([1, 1, 0, 0], bool))
  # Train-mode BatchNorm reduces over up to 2 x 16 x 16 = 512 values per channel, in
  # another batch shape (2 vs 4 with a mask): statistics and logits agree to 512 eps of
  # the size of what is summed (a leak of the padded 7.0s would move them by O(1)). A
  # running mean near 0 is a sum that cancels: its error follows the activations'
  # scale, the largest statistic of the model, not its own size.
  tol = sum_rtol(2 * 16 * 16)
  assert_tree_close(out[:2], real, rtol=tol, atol_rel=tol)
  scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(s_real))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale), s_pad, s_real)


def np_batchnorm_train(x, scale, bias, ra_mean, ra_var, mask, unbiased, momentum=0.9, eps=1e-5):
  """torch.nn.BatchNorm2d.train() forward, written out in float64 over the real examples."""
  real = np.asarray(x, np.float64)[np.asarray(mask, bool)]
  v = real.reshape(-1, real.shape[-1])
  n = v.shape[0]
  mean, var = v.mean(0), v.var(0)            # biased: what torch normalises with
  track = var * n / (n - 1) if unbiased else var
  y = (np.asarray(x, np.float64) - mean) / np.sqrt(var + eps) * scale + bias
  return y, momentum * ra_mean + (1 - momentum) * mean, momentum * ra_var + (1 - momentum) * track


@pytest.mark.parametrize('unbiased', [True, False])
def test_batchnorm_follows_torch_batchnorm2d(unbiased):
  rng = np.random.default_rng(0)
  x = rng.normal(1.5, 2.0, (4, 3, 5, 6)).astype(np.float32)     # n = 2 x 3 x 5 = 30 real
  mask = np.array([1, 0, 1, 0], bool)
  scale, bias = rng.normal(size=6), rng.normal(size=6)
  ra_mean, ra_var = rng.normal(size=6), rng.uniform(0.5, 2, size=6)
  variables = {'params': {'scale': scale.astype(np.float32), 'bias': bias.astype(np.float32)},
               'batch_stats': {'mean': ra_mean.astype(np.float32), 'var': ra_var.astype(np.float32)}}
  bn = models.BatchNorm(unbiased=unbiased)
  y, new = bn.apply(variables, jnp.asarray(x), True, jnp.asarray(mask).reshape(-1, 1, 1, 1),
                    mutable=['batch_stats'])
  want_y, want_mean, want_var = np_batchnorm_train(x, scale, bias, ra_mean, ra_var, mask, unbiased)
  tol = sum_rtol(30)
  np.testing.assert_allclose(np.asarray(y)[mask], want_y[mask], rtol=tol, atol=tol * 4)
  np.testing.assert_allclose(new['batch_stats']['mean'], want_mean, rtol=tol, atol=tol * 4)
  np.testing.assert_allclose(new['batch_stats']['var'], want_var, rtol=tol)
  # n/(n-1) = 30/29 is 3.4% here: the unbiased and biased trackers are told apart.
  other = np_batchnorm_train(x, scale, bias, ra_mean, ra_var, mask, not unbiased)[2]
  assert np.all(np.abs(np.asarray(new['batch_stats']['var']) - other) > 100 * tol * other)
  # Inference normalises with the running statistics.
  y_eval = bn.apply(variables, jnp.asarray(x), False)
  want_eval = (x - ra_mean) / np.sqrt(ra_var + 1e-5) * scale + bias
  np.testing.assert_allclose(y_eval, want_eval, rtol=1e-5, atol=1e-5)


def test_biased_batchnorm_is_flax_batchnorm():
  """unbiased=False is flax's nn.BatchNorm (what the model used before it followed torch)."""
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 8, 8, 5)) * 3 + 1
  mask = jnp.array([1, 1, 1, 0], bool).reshape(-1, 1, 1, 1)
  ours = models.BatchNorm(unbiased=False)
  theirs = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  v = ours.init(jax.random.PRNGKey(0), x, False)
  y1, s1 = ours.apply(v, x, True, mask, mutable=['batch_stats'])
  y2, s2 = theirs.apply(v, x, mask=mask, mutable=['batch_stats'])
  tol = sum_rtol(3 * 8 * 8)   # flax reduces E[x^2] - E[x]^2, ours (x - mean)^2: same sum size
  np.testing.assert_allclose(y1[:3], y2[:3], rtol=tol, atol=tol * 10)
  assert_tree_close(s1, s2, rtol=tol, atol_rel=tol)


def test_conv_biases_follow_torch_default_init():
  """torch.nn.Conv2d: bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = in_ch * kh * kw."""
  params, _ = models.init(models.UNet2D(base=8, levels=3), jax.random.PRNGKey(0), (16, 16, 3))
  kernels = {models.path_keys(p)[:-1]: k for p, k in jax.tree_util.tree_leaves_with_path(params)
             if models.path_keys(p)[-1] == 'kernel'}
  seen = 0
  for path, b in jax.tree_util.tree_leaves_with_path(params):
    keys = models.path_keys(path)
    if keys[-1] != 'bias' or models.BN in keys:
      continue
    kh, kw, cin, _ = kernels[keys[:-1]].shape
    bound = 1.0 / np.sqrt(cin * kh * kw)
    b = np.asarray(b)
    assert np.all(np.abs(b) <= bound), keys
    assert np.abs(b).max() > 0.3 * bound and len(set(b.tolist())) == b.size, keys   # spread, distinct
    seen += 1
  assert seen == 3 * 3 + (2 + 3) + 1   # 3 per encoder level; decoder up+out, then in+up+out; head
  zeros, _ = models.init(models.UNet2D(base=8, levels=3, bias_init='zeros'), jax.random.PRNGKey(0),
                         (16, 16, 3))
  assert all(not np.any(np.asarray(b)) for p, b in jax.tree_util.tree_leaves_with_path(zeros)
             if models.path_keys(p)[-1] == 'bias' and models.BN not in models.path_keys(p))
  with pytest.raises(ValueError, match='bias_init'):
    models.init(models.UNet2D(base=2, levels=2, bias_init='he'), jax.random.PRNGKey(0), (8, 8, 3))


def test_path_predicates():
  model = models.UNet2D(base=2)
  params, _ = models.init(model, jax.random.PRNGKey(0), (16, 16, 3))
  flags = jax.tree_util.tree_flatten_with_path(params)[0]
  heads = [models.path_keys(p) for p, _ in flags if models.is_head(p)]
  assert sorted(heads) == [('head', 'bias'), ('head', 'kernel')]
  bns = [models.path_keys(p) for p, _ in flags if models.is_bn(p)]
  assert len(bns) == 2 * 26 and all(k[-1] in ('scale', 'bias') for k in bns)


def test_bf16_compute_keeps_float32_state():
  """Mixed precision: bf16 compute, float32 parameters, statistics, logits and gradients."""
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 3))
  f32, b16 = models.UNet2D(base=2, levels=3), models.UNet2D(base=2, dtype=jnp.bfloat16, levels=3)
  params, stats = models.init(b16, jax.random.PRNGKey(0), (16, 16, 3))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  variables = {'params': params, 'batch_stats': stats}
  out, upd = jax.jit(lambda v: b16.apply(v, x, train=True, mutable=['batch_stats']))(variables)
  assert out.dtype == jnp.float32
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(upd['batch_stats']))
  ref = jax.jit(lambda v: f32.apply(v, x, train=False))(variables)
  low = jax.jit(lambda v: b16.apply(v, x, train=False))(variables)
  # bfloat16 keeps 8 bits (2^-8 = 0.4%) per operation, compounded over 15 layers.
  np.testing.assert_allclose(low, ref, atol=0.05 * float(jnp.abs(ref).max()) + 1e-3)
  grads = jax.jit(jax.grad(lambda p: jnp.mean(b16.apply({'params': p, 'batch_stats': stats}, x))))(params)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def np_conv_same(x, w, b):
  """Direct 'SAME' convolution, float64 loops over the window (the slow reference)."""
  k = w.shape[0]
  p = k // 2
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (p, p), (p, p), (0, 0)))
  h, wd = x.shape[1:3]
  out = np.zeros((*x.shape[:3], w.shape[-1]))
  for i in range(k):
    for j in range(k):
      out += xp[:, i:i + h, j:j + wd] @ np.asarray(w[i, j], np.float64)
  return out + np.asarray(b, np.float64)


def np_conv_same_grads(x, w, g):
  """Gradients of sum(g * conv_same(x, w)) w.r.t. x and w, float64 loops."""
  k = w.shape[0]
  p = k // 2
  h, wd = x.shape[1:3]
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (p, p), (p, p), (0, 0)))
  g = np.asarray(g, np.float64)
  dxp, dw = np.zeros_like(xp), np.zeros(w.shape)
  for i in range(k):
    for j in range(k):
      window = xp[:, i:i + h, j:j + wd]
      dw[i, j] = np.einsum('nhwc,nhwf->cf', window, g)
      dxp[:, i:i + h, j:j + wd] += g @ np.asarray(w[i, j], np.float64).T
  return dxp[:, p:p + h, p:p + wd], dw


@pytest.mark.parametrize('kernel', [1, 3])
def test_every_convolution_is_the_direct_convolution_with_nn_conv_parameters(kernel):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 7, 5, 4)), jnp.float32)     # odd, non-square
  ref = nn.Conv(6, (kernel, kernel), padding='SAME')
  variables = ref.init(jax.random.PRNGKey(0), x)
  variables = jax.tree.map(lambda v: v + 0.1, variables)          # nonzero bias
  p = variables['params']
  want = np_conv_same(x, p['kernel'], p['bias'])
  want_dx, want_dw = np_conv_same_grads(x, p['kernel'], np.cos(want))
  tol = sum_rtol(kernel * kernel * 4)
  # Gradient sums: 2*7*5 pixels (weights) or k*k*6 outputs (input), plus the cos.
  gtol = sum_rtol(2 * 7 * 5 + 10)
  grads = {}
  for impl in models.CONVS:
    conv = models.Conv(6, kernel, impl)
    assert jax.tree.map(jnp.shape, conv.init(jax.random.PRNGKey(0), x)) == jax.tree.map(jnp.shape, variables)
    got = conv.apply(variables, x)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())
    loss = lambda v, x: jnp.sum(jnp.sin(conv.apply(v, x)))
    grads[impl] = jax.grad(loss, (0, 1))(variables, x)
    dv, dx = grads[impl]
    np.testing.assert_allclose(dx, want_dx, rtol=gtol, atol=gtol * np.abs(want_dx).max(),
                               err_msg=impl)
    np.testing.assert_allclose(dv['params']['kernel'], want_dw, rtol=gtol,
                               atol=gtol * np.abs(want_dw).max(), err_msg=impl)
  for impl in set(models.CONVS) - {'xla'}:
    assert_tree_close(grads[impl], grads['xla'], rtol=gtol, atol_rel=gtol)
  np.testing.assert_allclose(models.Conv(6, kernel, 'xla').apply(variables, x), ref.apply(variables, x),
                             rtol=0, atol=0)
  with pytest.raises(ValueError, match='model.conv'):
    models.Conv(6, kernel, 'fft').apply(variables, x)


def test_canonical_gradients_are_the_same_inside_a_loop():
  """Inside lax.map (where XLA:CPU leaves autodiff's gradient convolutions slow) the
  hand-written gradients are the straight-line ones, per client, and second-order
  reverse mode works through them."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(3, 2, 6, 6, 4)), jnp.float32)   # 3 'clients'
  w = jnp.asarray(rng.normal(size=(3, 3, 4, 5)), jnp.float32)
  loss = lambda w, x: jnp.sum(jnp.tanh(models.conv_same(x, w)))
  looped = jax.jit(lambda w, x: jax.lax.map(lambda xi: jax.grad(loss)(w, xi), x))(w, x)
  for i in range(3):
    straight = jax.grad(loss)(w, x[i])
    np.testing.assert_allclose(looped[i], straight, rtol=sum_rtol(72),
                               atol=sum_rtol(72) * float(np.abs(straight).max()))
  ref = lambda w, x: jnp.sum(jnp.tanh(jax.lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))))
  hvp = lambda f: jax.grad(lambda w: jnp.sum(jax.grad(f)(w, x[0]) ** 2))(w)
  np.testing.assert_allclose(hvp(loss), hvp(ref), rtol=1e-4,
                             atol=1e-4 * float(np.abs(hvp(ref)).max()))


@pytest.mark.parametrize('conv', ['im2col', 'canonical'])
def test_unet_is_the_same_function_with_either_convolution(conv):
  x = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 16, 16, 3)), jnp.float32)
  a, b = (models.UNet2D(base=2, levels=3, conv=c) for c in ('xla', conv))
  params, stats = models.init(a, jax.random.PRNGKey(0), (16, 16, 3))
  params_b, _ = models.init(b, jax.random.PRNGKey(0), (16, 16, 3))
  jax.tree.map(np.testing.assert_array_equal, params, params_b)   # same init too
  for train in (False, True):
    out = [m.apply({'params': params, 'batch_stats': stats}, x, train=train,
                   mutable=['batch_stats'] if train else False) for m in (a, b)]
    ya, yb = (o[0] if train else o for o in out)
    np.testing.assert_allclose(yb, ya, rtol=1e-4, atol=1e-4 * float(np.abs(ya).max()))
