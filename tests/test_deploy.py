"""deploy: the round split into hospital and server halves, against the simulator."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fed_helpers import tiny_config
from pflresfim_jax import deploy, methods, train


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
  fed = train.load_federation(cfg)
  init_fn, round_fn = train.compile_method(cfg, fed, method)
  data, bank = train.device_data(fed), train.build_bank(fed, cfg)
  k_init, k_run = methods.run_keys(0)
  state = init_fn(k_init)
  for r in range(rounds):
    state, metrics = round_fn(state, data, bank, jax.random.fold_in(k_run, r), jnp.int32(r))
  return fed, state, metrics


def _loopback(tmp_path, cache, drop=lambda rnd, k: False):
  """A transport that calls each client directly; ``drop(round, k)`` loses a client."""
  def send(msgs):
    out = {}
    for k, (kind, meta, arrays) in msgs.items():
      if kind == deploy.TRAIN and drop(meta['round'], k):
        continue
      out[k] = deploy.handle(kind, meta, arrays, k, str(tmp_path / f'client{k}'), cache=cache)
    return out
  return send


def _client_params(cache, k):
  hospital = [h for key, h in cache.items() if key[0] == k and key[-1] != 'null'][-1]
  state, done = hospital.committed()
  return jax.tree.map(lambda x: np.asarray(x)[0], state['params']), done


def test_deployment_matches_the_simulator_and_survives_a_dropout(tmp_path):
  # One test for both (one compile): the round split over hospitals and server gives
  # the simulator's per-client parameters, and a client lost for a round rejoins.
  # lr 1e-6: Adam turns float-rounding differences into lr-sized steps; a tiny rate
  # keeps any such difference far below the tolerance.
  method = 'pfl_resfim'
  cfg = tiny_config(method=method, rounds=3, lr=1e-6,
                    **{'engine.client_axis': 'map', 'engine.unroll': 'false'})
  fed, state, metrics = _simulate(cfg, method, cfg.rounds)
  cache = {}
  result = deploy.serve(cfg, method, 0, fed.num_clients, _loopback(tmp_path / 'all', cache))
  assert result['clients'] == list(fed.clients)
  for k in range(fed.num_clients):
    params, done = _client_params(cache, k)
    assert done == cfg.rounds - 1
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state['params'])):
      # The simulator's per-client program run one client at a time: masked means of 3
      # clients (3 eps) after 3 rounds at lr 1e-6 (Adam's +-lr steps on noise-level
      # gradients could differ): 1e-5 relative, 1e-6 absolute.
      np.testing.assert_allclose(a, np.asarray(b)[k], rtol=1e-5, atol=1e-6)
    assert result['final'][k]['round'] == cfg.rounds - 1
    np.testing.assert_allclose(result['final'][k]['test']['dice'], metrics['test']['dice'][k],
                               rtol=1e-4, atol=1e-5)   # per-image fractions, averaged
  last = result['rounds'][-1]
  # ceil(ratio * size) entries per tensor: a fixed count, whatever the ties.
  np.testing.assert_allclose(last['local_fraction'], metrics['local_fraction'], rtol=1e-5)
  assert result['wire']['train_up'] > 0 and result['wire']['train_down'] > 0

  # Client 1 is lost in round 1: the round goes on with clients 0 and 2, and client 1
  # comes back in round 2 from its own saved state (round 0 completed late).
  cache = {}
  lost = lambda rnd, k: rnd == 1 and k == 1
  result = deploy.serve(cfg, method, 0, 3, _loopback(tmp_path / 'drop', cache, lost), min_clients=2)
  assert [r['clients'] for r in result['rounds']] == [[0, 1, 2], [0, 2], [0, 1, 2]]
  assert result['rounds'][1]['train_loss'][1] is None
  assert result['rounds'][1]['val_dice'][1] is None
  assert result['rounds'][0]['val_dice'][1] is not None and result['rounds'][2]['val_dice'][1] is not None
  _, done = _client_params(cache, 1)
  assert done == 2 and result['final'][1]['round'] == 2
  # Fewer answers than the configured minimum: a clear error naming the round.
  with pytest.raises(RuntimeError, match='round 1: 2 of 3 clients answered, fewer than min_clients=3'):
    deploy.serve(cfg, method, 1, 3, _loopback(tmp_path / 'strict', cache, lost), min_clients=3)
