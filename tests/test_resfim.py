import doctest
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pflresfim_jax import losses, resfim, spectral
from helpers import assert_tree_close, random_batch, sum_rtol, tiny_unet

pytestmark = pytest.mark.reference

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


class BNNet(nn.Module):
  """A small linen model with BatchNorm; ``train`` defaults to True on purpose."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Conv(1, (1, 1))(nn.relu(x))


class PlainNet(nn.Module):
  """A small linen model without state."""

  @nn.compact
  def __call__(self, x):
    return nn.Conv(1, (1, 1))(jnp.tanh(nn.Conv(3, (3, 3))(x)))


class NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.out = nnx.Conv(4, 1, (1, 1), rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.bn(self.conv(x))))


def reference(logits_fn, params, batch, sim):
  """Slow and obvious: a Python loop of per-example jax.grad, squares averaged in float64."""
  def fisher(images):
    grad = jax.jit(jax.grad(lambda p, x, y: losses.bce(logits_fn(p, x[None])[0], y)))
    acc = jax.tree.map(lambda p: np.zeros(p.shape, np.float64), params)
    for x, y in zip(images, batch['label']):
      acc = jax.tree.map(lambda a, g: a + np.asarray(g, np.float64) ** 2, acc, grad(params, x, y))
    return jax.tree.map(lambda a: a / len(images), acc)
  f0, f1 = fisher(batch['image']), fisher(sim)
  return jax.tree.map(lambda a, b: np.abs(b - a), f0, f1), f0, f1


def check(got, want, f0, f1):
  # R = |F_sim - F_orig| is a difference of two float32 Fisher estimates, so its error
  # scales with F, not with R: per leaf, 2 x 256 eps of max F (each gradient entry sums
  # over 16 x 16 pixels; squaring doubles the relative error), as in test_fisher.
  tol = sum_rtol(2 * 16 * 16)
  scale = jax.tree.map(lambda a, b: max(float(np.max(a)), float(np.max(b))), f0, f1)
  jax.tree.map(lambda g, w, s: np.testing.assert_allclose(g, w, rtol=tol, atol=tol * s + 1e-30),
               got, want, scale)
  assert sum(float(np.sum(x)) for x in jax.tree.leaves(got)) > 0


def styled(batch, ratio=0.1):
  """The batch with other clients' windows and a key (the library's style inputs)."""
  others = spectral.amplitude_bank(batch['image'][::-1] ** 2, ratio)
  return {**batch, 'style': others, 'key': jax.random.PRNGKey(3)}


def test_linen_with_batchnorm_in_inference_mode():
  model, batch = BNNet(), random_batch(6)
  variables = model.init(jax.random.PRNGKey(0), batch['image'][:1])
  # Running statistics away from their initial values, so inference mode matters.
  _, upd = model.apply(variables, batch['image'] * 3.0, mutable=['batch_stats'])
  variables = {'params': variables['params'], **upd}
  b = styled(batch)
  got = jax.jit(resfim.estimator(model, spectral_ratio=0.1, chunk_size=4))(variables, b)
  sim = spectral.simulate(b['key'], b['image'], -1, b['style'], jnp.zeros(6, jnp.int32), 0.1)
  want = reference(lambda p, x: model.apply({**variables, 'params': p}, x, train=False),
                   variables['params'], batch, sim)
  check(got, *want)


def test_linen_without_state_takes_bare_params_and_sim_image():
  model, batch = PlainNet(), random_batch(5)
  params = model.init(jax.random.PRNGKey(1), batch['image'][:1])['params']
  sim = jnp.clip(batch['image'] * 0.5 + 0.3, 0, 1)
  got = jax.jit(resfim.estimator(model))(params, {**batch, 'sim_image': sim})
  check(got, *reference(lambda p, x: model.apply({'params': p}, x), params, batch, sim))
  # The one-shot form gives the same.
  once = resfim.estimate(params, {**batch, 'sim_image': sim}, model)
  # Same math in another program (eager vs jitted): the Fisher tolerance of check().
  tol = sum_rtol(2 * 16 * 16)
  assert_tree_close(once, got, rtol=tol, atol_rel=tol)


def test_nnx_module_through_the_adapter():
  module, batch = NNXNet(nnx.Rngs(0)), random_batch(4)
  module.bn.mean[...] = jnp.full((4,), 0.3)
  module.bn.var[...] = jnp.full((4,), 2.0)
  apply_fn, variables = resfim.nnx_model(module)
  assert module.bn.use_running_average   # eval mode
  sim = 1.0 - batch['image']
  got = jax.jit(resfim.estimator(apply_fn))(variables, {**batch, 'sim_image': sim})
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  want = reference(lambda p, x: nnx.merge(graphdef, p, rest)(x), params, batch, sim)
  check(got, *want)


def test_trainer_bank_inputs_equal_simulate():
  """The trainer's form: the whole bank with owners; a client's own windows never drawn."""
  model, params, stats = tiny_unet()
  batch = random_batch(6)
  bank = spectral.amplitude_bank(batch['image'][::-1], 0.1)
  owner = jnp.array([1, 1, 1, 2, 2, 0])
  key = jax.random.PRNGKey(3)
  estimate = jax.jit(resfim.estimator(model, spectral_ratio=0.1, residual='relative'))
  variables = {'params': params, 'batch_stats': stats}
  got = estimate(variables, {**batch, 'style': bank, 'style_owner': owner, 'client_id': 0,
                             'key': key})
  sim = spectral.simulate(key, batch['image'], 0, bank, owner, 0.1)
  want = estimate(variables, {**batch, 'sim_image': sim})
  # Same program up to where the simulated images come from: float32 FFT round-off in
  # the images (~1e-7) moves the relative residual by about as much.
  assert_tree_close(got, want, rtol=1e-4, atol_rel=1e-4)


def test_relative_residual_and_zero_residual():
  f0 = {'a': jnp.array([1.0, 2.0, 0.0])}
  f1 = {'a': jnp.array([1.5, 2.0, 1e-9])}
  np.testing.assert_allclose(resfim.residual(f0, f1, 'relative', 1e-8)['a'], [0.5, 0.0, 1e-9 / 1e-8],
                             rtol=1e-6)   # elementwise float32 division: a few ulps
  model, params, stats = tiny_unet()
  batch = random_batch(3)
  r = resfim.estimate({'params': params, 'batch_stats': stats},
                      {**batch, 'sim_image': batch['image']}, model)
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(r)) == 0.0   # same program twice


def test_clear_errors():
  model, params, _ = PlainNet(), None, None
  batch = random_batch(2)
  params = model.init(jax.random.PRNGKey(0), batch['image'][:1])['params']
  with pytest.raises(ValueError, match="'sim_image', or 'style'"):
    resfim.estimate(params, batch, model)
  with pytest.raises(ValueError, match='resfim.residual'):
    resfim.estimator(model, residual='squared')
  with pytest.raises(ValueError, match='spectral.ratio'):
    resfim.estimator(model, spectral_ratio=1.5)
  with pytest.raises(ValueError, match='fisher.loss'):
    resfim.estimator(model, loss='hinge')


def test_partition_counts_per_tensor():
  _, params, _ = tiny_unet()
  scores = jax.tree.map(lambda p: jax.random.uniform(jax.random.PRNGKey(p.size), p.shape), params)
  for m in jax.tree.leaves(resfim.partition(scores, 0.2)):
    assert int(m.sum()) == int(np.ceil(0.2 * m.size - 1e-9))


def test_docstring_examples_run():
  result = doctest.testmod(resfim, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted >= 4 and result.failed == 0


def test_readme_example_runs_as_written():
  text = README.read_text()
  section = text[text.index('## ResFIM in your own code'):]
  code = re.search(r'```python\n(.*?)```', section, re.S).group(1)
  assert 20 <= len(code.strip().splitlines()) <= 40
  scope = {}
  exec(compile(code, 'README.md', 'exec'), scope)   # prints the new parameters' shapes
  new, local, stacked = scope['new_params'], scope['local'], scope['stacked_params']
  # What the example promises: kept-local entries stay each client's own, the shared
  # ones become the mean over clients (equal weights: 3 terms, float32 sums).
  for p, n, m in zip(*(jax.tree.leaves(t) for t in (stacked, new, local))):
    p, n, m = np.asarray(p, np.float64), np.asarray(n), np.asarray(m)
    assert np.array_equal(n[m], p[m])
    mean = (p * ~m).sum(0) / np.maximum((~m).sum(0), 1)
    np.testing.assert_allclose(n[~m], np.broadcast_to(mean, n.shape)[~m], rtol=1e-6,
                               atol=1e-7 * np.abs(p).max())
  frac = sum(int(np.sum(m)) for m in jax.tree.leaves(local)) / sum(m.size for m in jax.tree.leaves(local))
  assert 0.2 <= frac < 0.3   # ceil(20%) of every tensor
