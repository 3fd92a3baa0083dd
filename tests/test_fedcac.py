"""methods/fedcac: the official FedCAC rules (FLAIR-Community/Fling: fedcac_client.py
``evaluate_critical_parameter``, fedcac_group.py ``get_customized_global_models`` and
``sync``) written as slow numpy loops, against our jitted functions on hand-made
tensors: ties, all-zero and mostly-zero scores, a one-entry tensor, unequal client
sizes, rounds 0, 1, beta - 1 and beta."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fed_helpers import setup
from helpers import sum_rtol
from pflresfim_jax.methods import fedcac

pytestmark = pytest.mark.reference


def ref_critical(score, tau):
  """fedcac_client.py: per tensor, by rank, ties all in, nonzero-only fallback."""
  metric = [float(v) for v in np.ravel(score)]
  count = int(tau * len(metric))
  top = sorted(metric, reverse=True)[:count]
  threshold = top[-1] if top else np.inf
  if threshold <= 1e-10:
    nonzero = [v for v in metric if v > 1e-20]
    if nonzero:
      threshold = min(nonzero)
  return np.asarray(score) >= threshold


def ref_round(params, crit, sizes, rnd, beta):
  """fedcac_group.py: overlaps, the rising threshold, customized and global means."""
  k = len(params)
  vec = [np.concatenate([np.ravel(crit[i][n]) for n in sorted(crit[i])]).astype(np.float64)
         for i in range(k)]
  overlap = {}
  for i in range(k):
    for j in range(k):
      if i != j:
        overlap[i, j] = 1 - np.sum(np.abs(vec[i] - vec[j])) / (np.sum(vec[i]) * 2)
  mean = sum(overlap.values()) / (k * (k - 1))
  top = max(overlap.values())
  threshold = mean + (rnd + 1) / beta * (top - mean)
  groups = [[i] + [j for j in range(k) if j != i and overlap[i, j] >= threshold] for i in range(k)]
  total = sum(sizes)
  out = []
  for i in range(k):
    mixed = {}
    for n in params[i]:
      glob = sum(sizes[j] / total * np.asarray(params[j][n], np.float64) for j in range(k))
      custom = sum(np.asarray(params[j][n], np.float64) for j in groups[i]) / len(groups[i])
      mixed[n] = np.where(crit[i][n], custom, glob)
    out.append(mixed)
  return out, [len(g) for g in groups]


def _scores():
  """Per client (4), per tensor: hand-made scores with the rules' edge cases."""
  rng = np.random.default_rng(0)
  base = rng.integers(0, 6, size=(4, 4, 5)).astype(np.float32)      # many ties
  sparse = np.zeros((4, 9), np.float32)
  sparse[:, :2] = rng.random((4, 2)) + 0.5                         # 2 nonzero < floor(0.5*9)
  zeros = np.zeros((4, 6), np.float32)
  zeros[3] = rng.random(6)                                         # client 3 only: nonzero
  one = rng.random((4, 1)).astype(np.float32)                      # floor(0.5 * 1) = 0
  return {'a': base, 'sparse': sparse, 'zeros': zeros, 'one': one}


def test_critical_entries_follow_the_official_rule():
  for tau in (0.5, 0.3, 0.1):
    for name, s in _scores().items():
      for i in range(4):
        got = np.asarray(jax.jit(lambda x: fedcac.critical(x, tau))(jnp.asarray(s[i])))
        np.testing.assert_array_equal(got, ref_critical(s[i], tau), err_msg=f'{name} {i} tau {tau}')
  s = _scores()
  assert not fedcac.critical(jnp.asarray(s['one'][0]), 0.5).any()           # never critical
  assert fedcac.critical(jnp.asarray(s['zeros'][0]), 0.5).all()             # all zero: all in
  assert int(fedcac.critical(jnp.asarray(s['sparse'][0]), 0.5).sum()) == 2  # nonzero only
  ties = fedcac.critical(jnp.asarray(s['a'][0]), 0.5)
  assert int(ties.sum()) >= int(0.5 * 20)                                 # ties all in


@pytest.mark.parametrize('rnd', [0, 1, 3, 4])
def test_round_mixes_as_the_official_code(rnd):
  beta, tau = 4.0, 0.5
  _, _, algo, _, _ = setup('fedcac', **{'fedcac.beta': beta, 'fedcac.tau': tau})
  rng = np.random.default_rng(1)
  scores = _scores()
  # Parameters chosen so that |(theta - start) * theta| is exactly the score: start = theta - s/theta.
  theta = {n: (rng.random(s.shape) + 1.0).astype(np.float32) for n, s in scores.items()}
  start = {n: theta[n] - scores[n] / theta[n] for n in scores}
  state, crit = algo.method.client_stats({'params': jax.tree.map(jnp.asarray, theta)},
                                         jax.tree.map(jnp.asarray, start), None, None, None,
                                         jnp.int32(rnd), None)
  crit = jax.tree.map(np.asarray, crit)
  for n in scores:
    for i in range(4):   # the scores as computed in float32 from theta and start
      score = np.abs((theta[n][i] - start[n][i]) * theta[n][i])
      np.testing.assert_array_equal(crit[n][i], ref_critical(score, tau), err_msg=n)
  sizes = [10.0, 20.0, 30.0, 40.0]
  mixed, info = jax.jit(algo.method.mix)(jax.tree.map(jnp.asarray, theta), crit,
                                         jnp.asarray(sizes), jnp.int32(rnd))
  per_client = lambda tree, i: {n: tree[n][i] for n in tree}
  want, groups = ref_round([per_client(theta, i) for i in range(4)],
                           [per_client(crit, i) for i in range(4)], sizes, rnd, beta)
  assert np.asarray(info['collaborators']).tolist() == groups
  for i in range(4):
    for n in theta:   # means of up to 4 positive values (1 to 2): 4 float32 roundings
      np.testing.assert_allclose(np.asarray(mixed[n][i]), want[i][n], rtol=sum_rtol(4))
  if rnd == 0:        # round 0 is not plain FedAvg: somebody is left out of somebody's group
    assert min(groups) < 4
  if rnd == beta:     # past the most overlapping pair: nobody collaborates
    assert groups == [1, 1, 1, 1]


def test_absent_client_takes_no_part():
  crit = {'a': jnp.asarray(np.tile(np.array([1, 1, 0, 0], bool), (3, 1)))}
  crit['a'] = crit['a'].at[2].set(jnp.array([0, 0, 1, 1], bool))
  both = fedcac.collaborators(crit, jnp.array([1.0, 1.0, 1.0]), jnp.int32(0), 4.0)
  assert np.asarray(both).sum(1).tolist() == [2, 2, 1]
  gone = fedcac.collaborators(crit, jnp.array([1.0, 0.0, 1.0]), jnp.int32(0), 4.0)
  assert not bool(gone[0, 1]) and not bool(gone[1, 0]) and bool(gone[1, 1])
