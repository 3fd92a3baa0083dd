"""PN: FedAvg of a UNet normalised by learned population statistics (models.PopulationNorm)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pflresfim_jax import models
from fed_helpers import leaves_equal_across_clients, setup


@pytest.mark.reference
def test_population_norm_is_the_reference_formula_in_both_modes():
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, (3, 4, 4, 5)).astype(np.float32)
  p = {'scale': rng.normal(size=5), 'bias': rng.normal(size=5), 'pop_mean': rng.normal(size=5),
       'pop_gamma': rng.uniform(0.5, 2.0, 5)}
  params = {'params': {k: v.astype(np.float32) for k, v in p.items()}}
  want = (x - p['pop_mean']) / np.sqrt(p['pop_gamma'] + 1e-5) * p['scale'] + p['bias']
  norm = models.PopulationNorm()
  for train in (True, False):      # no batch statistics: training and inference agree
    np.testing.assert_allclose(norm.apply(params, jnp.asarray(x), train), want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='norm'):
    models.init(models.UNet2D(base=2, levels=2, norm='gn'), jax.random.PRNGKey(0), (8, 8, 3))


def test_pn_round_is_fedavg_of_a_population_normalised_unet():
  cfg, fed, algo, data, bank = setup('pn')
  state0 = jax.jit(algo.init)(jax.random.PRNGKey(0))
  assert state0['batch_stats'] == {}
  bn = state0['params']['enc1_0']['bn']
  assert set(bn) == {'scale', 'bias', 'pop_mean', 'pop_gamma'}
  k = fed.num_clients
  keys = [jax.random.split(jax.random.PRNGKey(i), k) for i in (1, 2)]
  trained, agg_mask, _ = jax.jit(algo.client)(state0, data['train'], bank, *keys, jnp.int32(0),
                                              jnp.arange(k))
  # The population statistics are learned: they moved from (0, 1) in training...
  t_bn = trained['params']['enc1_0']['bn']
  assert not np.allclose(t_bn['pop_mean'], 0.0) and not np.allclose(t_bn['pop_gamma'], 1.0)
  after, _ = jax.jit(algo.aggregate)(trained, agg_mask, data['train']['count'].astype(jnp.float32),
                                     jnp.int32(0))
  # ...and averaged with everything else.
  assert all(leaves_equal_across_clients(after['params']))
  assert not all(leaves_equal_across_clients(trained['params']))
  one = jax.tree.map(lambda v: v[0], after['params'])
  x = data['test']['image'][0, :2]
  train_out, _ = algo.method.model.apply({'params': one, 'batch_stats': {}}, x, train=True,
                                         mutable=['batch_stats'])
  eval_out = algo.method.predictor(one, {}, {})(x)
  np.testing.assert_allclose(train_out, eval_out, rtol=1e-5, atol=1e-5)
