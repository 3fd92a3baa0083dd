"""deploy: the round split into hospital and server halves, against the simulator."""
import ast
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fed_helpers import tiny_config
from pflresfim_jax import build, deploy, methods


def test_pack_unpack_round_trip_and_errors():
  rng = np.random.default_rng(0)
  tree = {'a': {'kernel': rng.normal(size=(3, 5)).astype(np.float32)},
          'b': rng.normal(size=(7,)).astype(np.float32)}
  send = {'a': {'kernel': rng.random((3, 5)) > 0.5}, 'b': np.zeros(7, bool)}
  flat = deploy.pack(tree, send, 'params')
  assert set(flat) == {'params/a/kernel', 'params/a/kernel#mask', 'params/b', 'params/b#mask'}
  assert flat['params/a/kernel'].size == send['a']['kernel'].sum() and flat['params/b'].size == 0
  assert flat['params/a/kernel#mask'].nbytes == 2          # 15 bits
  values, sent = deploy.unpack(tree, flat, 'params')
  np.testing.assert_array_equal(sent['a']['kernel'], send['a']['kernel'])
  np.testing.assert_array_equal(values['a']['kernel'], np.where(send['a']['kernel'], tree['a']['kernel'], 0))
  np.testing.assert_array_equal(values['b'], np.zeros(7))
  masks = deploy.unpack_mask(tree, deploy.pack_mask(send, 'm'), 'm')
  np.testing.assert_array_equal(masks['a']['kernel'], send['a']['kernel'])
  bad = {**flat, 'params/a/kernel': flat['params/a/kernel'][:-1]}
  with pytest.raises(ValueError, match="'params/a/kernel' holds"):
    deploy.unpack(tree, bad, 'params', 'client 2 upload')
  with pytest.raises(ValueError, match="client 2 upload: entry 'params/b' missing"):
    deploy.unpack(tree, {k: v for k, v in flat.items() if not k.startswith('params/b')},
                  'params', 'client 2 upload')
  assert deploy.unflatten(tree, deploy.flatten(tree))['b'].shape == (7,)
  assert deploy.under('params', flat) == {k[len('params/'):]: v for k, v in flat.items()}
  assert set(deploy.prefixed('up', deploy.under('params', flat))) == {'up/' + k[7:] for k in flat}


def _simulate(cfg, method, rounds):
  fed = build.load_federation(cfg)
  init_fn, round_fn = build.compile_method(cfg, fed, method)
  data, bank = build.device_data(fed), build.spectral_bank(fed, cfg)
  k_init, k_run = methods.run_keys(0)
  state = init_fn(k_init)
  for r in range(rounds):
    state, metrics = round_fn(state, data, bank, jax.random.fold_in(k_run, r), jnp.int32(r))
  return fed, state, metrics


def _loopback(tmp_path, cache, drop=lambda rnd, k: False, banks=None):
  """A transport that calls each client directly; ``drop(round, k)`` loses a client;
  ``banks`` (a list) collects (round, client) of each training message carrying the bank."""
  def send(msgs):
    out = {}
    for k, (kind, meta, arrays) in msgs.items():
      if banks is not None and any(n.startswith('bank/') for n in arrays):
        banks.append((meta['round'], k))
      if kind == deploy.TRAIN and drop(meta['round'], k):
        continue
      out[k] = deploy.handle(kind, meta, arrays, k, str(tmp_path / f'client{k}'), cache=cache)
    return out
  return send


def _client_state(cache, k):
  """Client k's committed state (no client axis) and the last round it completed."""
  hospital = [h for key, h in cache.items() if key[0] == k and isinstance(h, deploy.Hospital)][-1]
  state, done = hospital.committed()
  return jax.tree.map(lambda x: np.asarray(x)[0], state), done


# Deployment and simulator share every function but not the programs: the simulator
# runs K=3 clients in one program, a hospital one. lr 1e-6: Adam turns float-rounding
# differences into lr-sized steps; a tiny rate keeps any such difference far below the
# tolerances. 'map' and compact loops: the per-client program of the simulator is
# the hospital's program.
# Two resolution levels: the smallest UNet, so each method's two programs compile fastest.
DEPLOY = {'engine.client_axis': 'map', 'engine.unroll': 'false', 'lr': 1e-6, 'model.levels': 2}


# Every registered method, and the README's example of a method from outside the package.
EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'examples',
                       'update_mask.py') + ':UpdateMask'


# Not marked 'reference' (not rerun under SSE4.2, for the suite's time budget): the
# two sides run on one instruction set, and the tolerances are far above its rounding.
@pytest.mark.parametrize('method', [*methods.names(), EXAMPLE])
def test_deployed_round_equals_the_simulator(tmp_path, method):
  """Every registered method: 3 clients, 2 rounds, deploy.serve over a loopback
  transport against build.compile_method's round (a method added to the registry is
  covered here without editing this test)."""
  cfg = tiny_config(method=method, rounds=2, **DEPLOY)
  fed, state, metrics = _simulate(cfg, method, cfg.rounds)
  cache = {}
  result = deploy.serve(cfg, method, 0, fed.num_clients, _loopback(tmp_path, cache))
  assert result['clients'] == list(fed.clients)
  # Each hospital's state folder is its own, below its state_dir (a module:Class spec
  # is made one file name).
  assert all(len(os.listdir(tmp_path / f'client{k}')) == 1 for k in range(fed.num_clients))
  for k in range(fed.num_clients):
    mine, done = _client_state(cache, k)
    assert done == cfg.rounds - 1 and result['final'][k]['round'] == cfg.rounds - 1
    want = jax.tree.map(lambda x: np.asarray(x)[k], state)
    for part in ('params', 'batch_stats', 'personal'):
      # Masked means of 3 clients (3 eps) after 2 rounds at lr 1e-6: 1e-5 relative,
      # 1e-6 absolute (BatchNorm means near 0).
      for a, b in zip(jax.tree.leaves(mine[part]), jax.tree.leaves(want[part])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f'{method} {part}')
    # Masks are chosen by ranking scores the two programs compute in their own float
    # order: near-ties may flip, so 99.5% of the entries must agree (all do here).
    agree = [np.mean(a == b) for a, b in zip(jax.tree.leaves(mine['local_mask']),
                                             jax.tree.leaves(want['local_mask']))]
    assert min(agree) >= 0.995, (method, min(agree))
    for split in ('val', 'test'):
      np.testing.assert_allclose(result['final'][k][split]['dice'], metrics[split]['dice'][k],
                                 rtol=1e-4, atol=1e-5)   # per-image fractions, averaged
  # Fractions are counts over a fixed size: the same whatever the ties.
  np.testing.assert_allclose(result['rounds'][-1]['local_fraction'], metrics['local_fraction'],
                             rtol=1e-5)
  if 'collaborators' in metrics:
    assert result['rounds'][-1]['collaborators'] == [float(c) for c in metrics['collaborators']]
  if 'mask_overlap' in metrics:   # near-ties may flip (above): within a percent
    np.testing.assert_allclose(result['rounds'][-1]['mask_overlap'], metrics['mask_overlap'],
                               atol=0.01)
  sent = result['wire']['train_up']
  assert (sent > 0) and (result['wire']['train_down'] > 0)


def test_a_lost_client_rejoins_and_min_clients_is_enforced(tmp_path):
  # Client 1 is lost in round 1: the round goes on with clients 0 and 2, and client 1
  # comes back in round 2 from its own saved state (round 0 completed late).
  method = 'pfl_resfim'
  cfg = tiny_config(method=method, rounds=3, **DEPLOY)
  cache, banks = {}, []
  lost = lambda rnd, k: rnd == 1 and k == 1
  result = deploy.serve(cfg, method, 0, 3, _loopback(tmp_path / 'drop', cache, lost, banks),
                        min_clients=2)
  assert [r['clients'] for r in result['rounds']] == [[0, 1, 2], [0, 2], [0, 1, 2]]
  # The style bank crosses the wire once per client, and again to the one that did not
  # confirm it (lost in round 1, so sent again in round 2).
  assert sorted(banks) == [(0, 0), (0, 1), (0, 2), (2, 1)]
  assert result['rounds'][1]['train_loss'][1] is None
  assert result['rounds'][1]['val_dice'][1] is None
  assert result['rounds'][0]['val_dice'][1] is not None and result['rounds'][2]['val_dice'][1] is not None
  _, done = _client_state(cache, 1)
  assert done == 2 and result['final'][1]['round'] == 2
  # Fewer answers than the configured minimum: a clear error naming the round.
  with pytest.raises(RuntimeError, match='round 1: 2 of 3 clients answered, fewer than min_clients=3'):
    deploy.serve(cfg, method, 1, 3, _loopback(tmp_path / 'strict', cache, lost), min_clients=3)


def test_deploy_and_flower_name_no_method():
  """What crosses the wire comes from each method's Contract, never from its name."""
  import pflresfim_jax
  folder = os.path.dirname(pflresfim_jax.__file__)
  for module in ('deploy.py', 'flower.py', 'flower_client.py', 'flower_worker.py'):
    tree = ast.parse(open(os.path.join(folder, module)).read())
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
               and isinstance(n.value, str)}
    named = sorted(strings & set(methods.names()))
    assert not named, f'{module} names {named}'
