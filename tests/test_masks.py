import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pflresfim_jax import masks, models
from helpers import EPS32, tiny_unet


def test_top_k_count():
  assert masks.top_k_count(10, 0.2) == 2
  assert masks.top_k_count(1, 0.2) == 1
  assert masks.top_k_count(7, 0.0) == 0
  assert masks.top_k_count(7, 1.0) == 7
  with pytest.raises(ValueError):
    masks.top_k_count(7, 1.5)


def test_tensor_scope_counts_and_order():
  rng = np.random.default_rng(0)
  scores = {'a': jnp.asarray(rng.uniform(size=(5, 4))), 'b': jnp.asarray(rng.uniform(size=(3,)))}
  m = masks.top_fraction(scores, 0.3, 'tensor')
  assert int(m['a'].sum()) == 6 and int(m['b'].sum()) == 1
  a = np.asarray(scores['a']).ravel()
  np.testing.assert_array_equal(np.sort(np.flatnonzero(np.asarray(m['a']).ravel())),
                                np.sort(np.argsort(-a)[:6]))


def _stable_sort_reference(scores, k):
  """The k first entries of a stable sort by descending score, NaN as -inf."""
  s = np.where(np.isnan(scores), -np.inf, scores)
  picked = np.zeros(s.shape, bool)
  picked[np.argsort(-s, kind='stable')[:k]] = True
  return picked


@pytest.mark.parametrize('kind', ['normal', 'ties', 'specials'])
def test_top_k_flat_equals_a_stable_sort(kind):
  rng = np.random.default_rng(1)
  n = 5003
  s = rng.standard_normal(n).astype(np.float32)
  if kind == 'ties':          # few distinct values: the k-th is tied many times
    s = np.round(s * 2) / 2
  if kind == 'specials':      # NaN (last), +-inf, +-0 (tied), extremes; not subnormals,
    # which XLA:CPU's comparisons flush to zero and numpy's do not
    s = rng.choice(np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-37, -1e-37, 1.0, -1.0,
                             3.4e38, -3.4e38], np.float32), n)
  for sign in (1.0, -1.0):
    for k in (1, 7, 1000, 2501, n - 1, n):
      got = np.asarray(masks._top_k_flat(jnp.asarray(sign * s), k))
      np.testing.assert_array_equal(got, _stable_sort_reference(sign * s, k),
                                    err_msg=f'{kind}, sign {sign}, k {k}')


def test_ties_are_deterministic():
  scores = {'a': jnp.array([1.0, 2.0, 2.0, 2.0, 0.0])}
  m = masks.top_fraction(scores, 0.4, 'tensor')
  np.testing.assert_array_equal(m['a'], [False, True, True, False, False])
  m2 = jax.jit(lambda s: masks.top_fraction(s, 0.4))(scores)
  np.testing.assert_array_equal(m2['a'], m['a'])


def test_global_scope_normalises_by_leaf_mean():
  # 'big' has 1000x the scale of 'small'; after dividing by the mean they compete evenly.
  scores = {'big': jnp.array([1000.0, 3000.0]), 'small': jnp.array([1.0, 3.0])}
  m = masks.top_fraction(scores, 0.5, 'global')
  np.testing.assert_array_equal(m['big'], [False, True])
  np.testing.assert_array_equal(m['small'], [False, True])
  with pytest.raises(ValueError, match='scope'):
    masks.top_fraction(scores, 0.5, 'layer')


def test_path_masks_on_unet():
  _, params, _ = tiny_unet()
  head, bn = masks.head(params), masks.batchnorm(params)
  assert bool(head['head']['kernel'].all()) and not bool(head['enc1_0']['conv']['kernel'].any())
  assert bool(bn['enc1_0']['bn']['scale'].all()) and not bool(bn['enc1_0']['conv']['bias'].any())
  body = masks.body(params)
  total = models.count_params(params)
  assert int(masks.fraction_true(body) * total + 0.5) == total - params['head']['kernel'].size - 1


def test_module_fractions_match_a_count():
  params = {'enc1_0': {'conv': {'kernel': jnp.zeros((3, 3, 1, 2)), 'bias': jnp.zeros(2)},
                       'bn': {'scale': jnp.zeros(2), 'bias': jnp.zeros(2)}},
            'head': {'kernel': jnp.zeros((1, 1, 2, 1)), 'bias': jnp.zeros(1)}}
  mask = jax.tree.map(lambda x: jnp.zeros(x.shape, bool), params)
  mask['enc1_0']['conv']['kernel'] = mask['enc1_0']['conv']['kernel'].at[0, 0].set(True)  # 2 of 18
  mask['enc1_0']['conv']['bias'] = jnp.array([True, False])                               # 1 of 2
  mask['head']['bias'] = jnp.array([True])
  got = masks.module_fractions(mask)
  assert set(got) == {'enc1_0/conv', 'enc1_0/bn', 'head'}
  # Counts over a size, each one float32 division: within an ulp of the fraction.
  np.testing.assert_allclose(got['enc1_0/conv'], 3 / 20, rtol=EPS32)
  np.testing.assert_array_equal(got['enc1_0/bn'], 0.0)
  np.testing.assert_allclose(got['head'], 1 / 3, rtol=EPS32)
  stacked = jax.vmap(masks.module_fractions)(masks.stack(mask, 2))
  assert stacked['head'].shape == (2,)


def test_overlap_and_kept_against_counting():
  rng = np.random.default_rng(3)
  prev = {'a': rng.random((3, 4, 5)) < 0.3, 'b': rng.random((3, 6)) < 0.5}
  cur = {'a': rng.random((3, 4, 5)) < 0.3, 'b': rng.random((3, 6)) < 0.5}
  cur['a'][2], cur['b'][2] = False, False          # client 2 keeps nothing local
  flat = lambda t: np.concatenate([t['a'].reshape(3, -1), t['b'].reshape(3, -1)], 1)
  p, c = flat(prev), flat(cur)
  got = np.asarray(masks.overlap(jax.tree.map(jnp.asarray, cur)))
  for i in range(3):
    for j in range(3):
      want = (c[i] & c[j]).sum() / c[i].sum() if c[i].sum() else 0.0
      np.testing.assert_allclose(got[i, j], want, rtol=EPS32)
  want_kept = [(p[k] & c[k]).sum() / c[k].sum() if c[k].sum() else 0.0 for k in range(3)]
  np.testing.assert_allclose(masks.kept(jax.tree.map(jnp.asarray, prev),
                                        jax.tree.map(jnp.asarray, cur)), want_kept, rtol=EPS32)
