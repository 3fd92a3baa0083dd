import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pflresfim_jax import aggregate
from helpers import sum_rtol

pytestmark = pytest.mark.reference


def np_masked_mean(theta, mask, w):
  """Double loop over clients and entries: METHOD.md 4 written out."""
  k = theta.shape[0]
  flat = theta.reshape(k, -1).astype(np.float64)
  m = mask.reshape(k, -1)
  out = flat.copy()
  for e in range(flat.shape[1]):
    num = den = 0.0
    for c in range(k):
      if not m[c, e]:
        num += w[c] * flat[c, e]
        den += w[c]
    for c in range(k):
      if not m[c, e] and den > 0:
        out[c, e] = num / den
  return out.reshape(theta.shape)


def test_against_double_loop():
  rng = np.random.default_rng(0)
  k = 5
  params = {'a': rng.normal(size=(k, 4, 3)).astype(np.float32),
            'b': rng.normal(size=(k, 7)).astype(np.float32)}
  mask = {'a': rng.uniform(size=(k, 4, 3)) < 0.4, 'b': rng.uniform(size=(k, 7)) < 0.4}
  mask['a'][:, 0, 0] = True    # local for every client
  mask['a'][:, 1, :] = False   # shared by all
  w = np.array([3.0, 1.0, 0.0, 2.0, 5.0], np.float32)
  got = aggregate.masked_mean(jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, mask),
                              jnp.asarray(w))
  for key in params:
    # A weighted mean of k float32 terms against float64: error ~ k eps of the terms.
    np.testing.assert_allclose(got[key], np_masked_mean(params[key], mask[key], w), rtol=sum_rtol(k),
                               atol=sum_rtol(k) * np.abs(params[key]).max())
  np.testing.assert_array_equal(got['a'][:, 0, 0], params['a'][:, 0, 0])


def test_no_local_equals_fedavg():
  rng = np.random.default_rng(1)
  params = {'a': jnp.asarray(rng.normal(size=(4, 3, 3)), jnp.float32)}
  w = jnp.array([1.0, 2.0, 3.0, 4.0])
  got = aggregate.masked_mean(params, {'a': jnp.zeros((4, 3, 3), bool)}, w)
  want = aggregate.fedavg(params, w)
  np.testing.assert_allclose(got['a'], want['a'], rtol=1e-6)
  np.testing.assert_allclose(want['a'][0], np.tensordot(np.asarray(w), params['a'], 1) / 10.0, rtol=1e-6)
  # an unstacked (shared) mask broadcasts over clients
  got2 = aggregate.masked_mean(params, {'a': jnp.zeros((3, 3), bool)}, w)
  np.testing.assert_allclose(got2['a'], want['a'], rtol=1e-6)


def test_group_mean():
  theta = {'x': jnp.array([[1.0], [2.0], [4.0]])}
  adj = jnp.array([[1, 1, 0], [1, 1, 1], [0, 0, 1]], bool)
  got = aggregate.group_mean(theta, adj, jnp.array([1.0, 1.0, 2.0]))
  np.testing.assert_array_equal(got['x'][:, 0], [1.5, (1 + 2 + 8) / 4, 4.0])   # exact in float32


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_invariants(k, n, seed):
  """All-local is the identity; result is idempotent; shared entries agree across clients."""
  rng = np.random.default_rng(seed)
  theta = {'p': jnp.asarray(rng.normal(size=(k, n)), jnp.float32)}
  w = jnp.asarray(rng.uniform(0.5, 2.0, size=k), jnp.float32)
  mask = {'p': jnp.asarray(rng.uniform(size=(k, n)) < 0.5)}
  np.testing.assert_array_equal(aggregate.masked_mean(theta, {'p': jnp.ones((k, n), bool)}, w)['p'],
                                theta['p'])
  once = aggregate.masked_mean(theta, mask, w)
  twice = aggregate.masked_mean(once, mask, w)
  # The mean of k equal values is that value up to k eps of it.
  np.testing.assert_allclose(twice['p'], once['p'], rtol=sum_rtol(k),
                             atol=sum_rtol(k) * float(jnp.abs(theta['p']).max()))
  shared = ~np.asarray(mask['p'])
  for e in range(n):
    vals = np.asarray(once['p'])[shared[:, e], e]
    if vals.size:   # one mean per entry, broadcast to its sharing clients: identical
      np.testing.assert_array_equal(vals, vals[0])


def test_client_weights():
  counts = jnp.array([0, 1, 8, 9, 17])
  # FL-MedSegBench weighs by len(train_loader): batches per epoch, the last one partial.
  np.testing.assert_array_equal(aggregate.client_weights(counts, 8), [0, 1, 1, 2, 3])
  np.testing.assert_array_equal(aggregate.client_weights(counts, 8, 'examples'), [0, 1, 8, 9, 17])
  with pytest.raises(ValueError, match='aggregate_weights'):
    aggregate.client_weights(counts, 8, 'sizes')


def test_docstring_example_runs():
  import doctest
  result = doctest.testmod(aggregate, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0
