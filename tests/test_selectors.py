"""Each mask selector picks the entries it should, on hand-made Fisher diagonals."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pflresfim_jax import selectors

# Hand-made diagonals: 'w' (12 entries) and 'b' (5). The residual |F_sim - F_orig| and
# F_orig rank the entries differently, so every selector has its own answer.
F_ORIG = {'w': np.array([[9.0, 0.1, 0.2, 5.0], [0.3, 0.0, 7.0, 0.4], [0.5, 6.0, 0.6, 0.7]]),
          'b': np.array([0.1, 4.0, 0.2, 0.3, 0.0])}
F_SIM = {'w': np.array([[9.0, 3.1, 0.2, 5.5], [0.3, 8.0, 7.0, 0.4], [2.5, 6.0, 0.6, 0.7]]),
         'b': np.array([0.1, 4.0, 3.2, 0.3, 1.0])}


def ref_pick(score, ratio, lowest=False):
  """The slow rule: sort entries by score (ties by index), take ceil(ratio * n)."""
  flat = np.asarray(score, np.float64).ravel()
  n = int(math.ceil(ratio * flat.size - 1e-9))
  order = sorted(range(flat.size), key=lambda i: (flat[i] if lowest else -flat[i], i))
  out = np.zeros(flat.size, bool)
  out[order[:n]] = True
  return out.reshape(np.shape(score))


def fishers():
  as_jnp = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)
  return as_jnp(F_ORIG), as_jnp(F_SIM)


@pytest.mark.parametrize('selector,score,lowest', [
    ('residual', lambda o, s: abs(s - o), False),
    ('fisher', lambda o, s: o, False),
    ('inverse', lambda o, s: abs(s - o), True)])
def test_fisher_selectors_pick_by_their_score(selector, score, lowest):
  got = selectors.select(selector, 0.25, fishers=fishers())
  for name in F_ORIG:
    want = ref_pick(score(F_ORIG[name], F_SIM[name]), 0.25, lowest)
    np.testing.assert_array_equal(got[name], want, err_msg=f'{selector} {name}')


def test_the_three_fisher_selectors_disagree_here():
  picks = {s: np.asarray(selectors.select(s, 0.25, fishers=fishers())['w'])
           for s in ('residual', 'fisher', 'inverse')}
  # residual: the entries the style moved; fisher: the large ones; inverse: unmoved ones.
  assert picks['residual'][1, 1] and picks['residual'][0, 1] and not picks['residual'][0, 0]
  assert picks['fisher'][0, 0] and not picks['fisher'][1, 1]
  assert not (picks['inverse'] & picks['residual']).any()


def test_inverse_global_scope_takes_the_lowest_after_normalising():
  o, s = fishers()
  got = selectors.select('inverse', 0.25, 'global', fishers=(o, s))
  r = {n: np.abs(F_SIM[n] - F_ORIG[n]) for n in F_ORIG}
  # Leaves in pytree order ('b' before 'w'), each divided by its mean (+1e-12).
  flat = np.concatenate([(r[n] / (r[n].mean() + 1e-12)).ravel() for n in ('b', 'w')])
  want = ref_pick(flat, 0.25, lowest=True)
  np.testing.assert_array_equal(np.concatenate([np.ravel(got['b']), np.ravel(got['w'])]), want)


def test_random_picks_the_count_and_follows_the_key():
  params = {'w': jnp.zeros((40, 5)), 'b': jnp.zeros((7,))}
  pick = lambda seed: selectors.select('random', 0.2, params=params, key=jax.random.PRNGKey(seed))
  a, b, again = pick(0), pick(1), pick(0)
  assert int(a['w'].sum()) == 40 and int(a['b'].sum()) == 2
  jax.tree.map(np.testing.assert_array_equal, a, again)
  assert not np.array_equal(a['w'], b['w'])


def test_fedcac_ranks_by_update_times_value():
  start = {'w': jnp.array([1.0, 1.0, 1.0, -2.0, 0.0])}
  params = {'w': jnp.array([1.5, 3.0, 1.0, -1.0, 0.5])}
  got = selectors.select('fedcac', 0.4, params=params, start=start)
  want = ref_pick(np.abs((np.asarray(params['w']) - np.asarray(start['w'])) * np.asarray(params['w'])), 0.4)
  np.testing.assert_array_equal(got['w'], want)   # 6.0 and 1.0 (not 0.75 or 0.25)
  np.testing.assert_array_equal(want, [False, True, False, True, False])


def test_bad_selector_and_missing_fishers_are_named():
  with pytest.raises(ValueError, match='resfim.selector'):
    selectors.select('magic', 0.2, fishers=fishers())
  with pytest.raises(ValueError, match="'fisher'.*needs the Fisher pair"):
    selectors.select('fisher', 0.2)
