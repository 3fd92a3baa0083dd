import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pflresfim_jax import fisher, fisher_layers, losses, models, resfim, spectral
from helpers import assert_tree_close, random_batch, tiny_unet
from test_fisher import FISHER_RTOL, reference

pytestmark = pytest.mark.reference


def moved_stats(stats, seed=1):
  """Running statistics away from their init (mean 0, var 1), so BatchNorm's gradient
  formula is exercised."""
  leaves, treedef = jax.tree.flatten(stats)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.5 * jax.random.uniform(k, x.shape)
                                      for x, k in zip(leaves, keys)])


def layers_fisher(model, variables, batch, chunk, mask=None):
  squares = fisher_layers.squares_fn(model, variables, losses.bce, {'train': False})
  batches = jax.tree.map(lambda x: x[None], batch)
  f = fisher.accumulate(squares, variables['params'], batches, chunk,
                        None if mask is None else mask[None])
  return jax.tree.map(lambda x: x[0], f)


def reference_fisher(model, variables, batch, mask=None):
  def loss_fn(p, ex):
    logits = model.apply({**variables, 'params': p}, ex['image'][None], train=False)[0]
    return losses.bce(logits, ex['label'])
  return reference(loss_fn, variables['params'], batch, mask)


@pytest.mark.parametrize('norm,chunk', [('bn', 1), ('bn', 3), ('pn', 8)])
def test_matches_per_example_grad_loop(norm, chunk):
  """BatchNorm (running statistics) and PopulationNorm UNets; chunks of 1, of 3 (the 7
  examples padded to 9) and of 8 (more than there are); two examples masked out."""
  model = models.UNet2D(base=2, levels=3, norm=norm)
  params, stats = models.init(model, jax.random.PRNGKey(0), (16, 16, 3))
  variables = {'params': params}
  if norm == 'bn':
    variables['batch_stats'] = moved_stats(stats)
  else:   # learned population statistics away from their init too
    variables['params'] = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.3 if 'pop_' in jax.tree_util.keystr(path) else x, params)
  batch = random_batch(7)
  mask = jnp.array([True, True, False, True, True, False, True])
  got = layers_fisher(model, variables, batch, chunk, mask)
  want = reference_fisher(model, variables, batch, np.asarray(mask))
  assert jax.tree.structure(got) == jax.tree.structure(variables['params'])
  assert_tree_close(got, want, rtol=FISHER_RTOL, atol_rel=FISHER_RTOL)


class SharedConv(nn.Module):
  """One Conv applied twice (its gradients add up), a 1x1 head."""

  @nn.compact
  def __call__(self, x, train=False):
    conv = models.Conv(3, 3, name='shared')
    y = models.BatchNorm(name='bn')(conv(x), train)
    return models.Conv(1, 1, name='head')(conv(nn.relu(y)))


def test_a_layer_called_twice_sums_its_gradients():
  model = SharedConv()
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  variables = {'params': variables['params'], 'batch_stats': moved_stats(variables['batch_stats'])}
  batch = random_batch(4)
  got = layers_fisher(model, variables, batch, 4)
  assert_tree_close(got, reference_fisher(model, variables, batch),
                    rtol=FISHER_RTOL, atol_rel=FISHER_RTOL)


def test_fisher_pair_layers_equals_vmap():
  """resfim.fisher_pair's two Fishers (real and restyled images), 'layers' against
  'vmap' at chunk 1, the padding mask included."""
  model, params, stats = tiny_unet()
  variables = {'params': params, 'batch_stats': moved_stats(stats)}
  batch = random_batch(6)
  batch.update(mask=jnp.arange(6) < 5, key=jax.random.PRNGKey(2),
               style=spectral.amplitude_bank(batch['image'][::-1], ratio=0.1))
  got = {g: jax.jit(resfim.fisher_pair(model, loss='nll', spectral_ratio=0.1, grads=g,
                                       chunk_size=4 if g == 'layers' else 1))(variables, batch)
         for g in resfim.GRADS}
  assert_tree_close(got['layers'], got['vmap'], rtol=FISHER_RTOL, atol_rel=FISHER_RTOL)


class FlaxConv(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return nn.Conv(1, (1, 1))(x)


def test_bad_models_and_values_name_the_field():
  batch = random_batch(2)
  flax_conv = FlaxConv()   # flax's own Conv is not one of the LAYERS
  v = flax_conv.init(jax.random.PRNGKey(0), batch['image'])
  with pytest.raises(ValueError, match="fisher.grads='vmap'"):
    layers_fisher(flax_conv, v, batch, 2)
  model, params, stats = tiny_unet()
  half = models.UNet2D(base=2, levels=3, dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match='float32'):
    layers_fisher(half, {'params': params, 'batch_stats': stats}, batch, 2)
  with pytest.raises(ValueError, match='fisher.grads must be one of'):
    resfim.fisher_pair(model, grads='loop')
  with pytest.raises(ValueError, match='flax.linen model'):
    resfim.fisher_pair(lambda v, x: x[..., :1], grads='layers')
