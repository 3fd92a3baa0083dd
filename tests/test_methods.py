"""Each method's defining behaviour, on a tiny UNet and a 3-site phantom at 16x16; the registry."""
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pflresfim_jax import build, masks, methods, models
from fed_helpers import leaves_equal_across_clients, setup
from helpers import EPS32, assert_tree_close, sum_rtol
from test_fedcac import ref_critical


def mean_tol(x):
  """A float32 weighted mean over the 3 clients against float64: 3 eps of the terms."""
  return dict(rtol=sum_rtol(3), atol=sum_rtol(3) * float(np.abs(x).max()))


@functools.lru_cache(maxsize=None)
def one_round(method, **overrides):
  cfg, fed, algo, data, bank = setup(method, **dict(overrides))
  state0 = jax.jit(algo.init)(jax.random.PRNGKey(0))
  k = fed.num_clients
  keys = [jax.random.split(jax.random.PRNGKey(i), k) for i in (1, 2)]
  trained, agg_mask, _ = jax.jit(algo.client)(state0, data['train'], bank, *keys, jnp.int32(0),
                                              jnp.arange(k))
  weights = data['train']['count'].astype(jnp.float32)
  after, info = jax.jit(algo.aggregate)(trained, agg_mask, weights, jnp.int32(0))
  return state0, trained, after, info, data


def by_kind(tree, predicate):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [x for p, x in flat if predicate(p)], [x for p, x in flat if not predicate(p)]


def all_equal_across_clients(leaves):
  return all(leaves_equal_across_clients(leaves))


def none_equal_across_clients(leaves):
  return not any(leaves_equal_across_clients(leaves))


def test_unknown_method():
  with pytest.raises(ValueError, match='config.method'):
    setup('fedfoo')


def test_local_keeps_everything():
  _, trained, after, info, _ = one_round('local')
  jax.tree.map(np.testing.assert_array_equal, trained['params'], after['params'])
  assert none_equal_across_clients(after['params'])
  np.testing.assert_array_equal(info['local_fraction'], 1.0)   # a count over itself


@pytest.mark.reference   # against numpy / another program
@pytest.mark.parametrize('method', ['fedavg', 'fedprox'])
def test_fedavg_family_shares_everything(method):
  _, trained, after, _, data = one_round(method)
  assert all_equal_across_clients(after['params']) and all_equal_across_clients(after['batch_stats'])
  w = np.asarray(data['train']['count'], np.float64)
  x = np.asarray(trained['params']['head']['kernel'], np.float64)
  np.testing.assert_allclose(after['params']['head']['kernel'][0],
                             np.tensordot(w, x, 1) / w.sum(), **mean_tol(x))


def test_fedprox_pull():
  s0, weak, _, _, _ = one_round('fedprox')
  _, strong, _, _, _ = one_round('fedprox', **{'fedprox.mu': 1e4})
  dist = lambda t: sum(float(jnp.sum((a - b) ** 2)) for a, b in
                       zip(jax.tree.leaves(t['params']), jax.tree.leaves(s0['params'])))
  assert dist(strong) < dist(weak)


def test_fedbn_keeps_bn_local():
  _, trained, after, _, _ = one_round('fedbn')
  bn, rest = by_kind(after['params'], models.is_bn)
  assert none_equal_across_clients(bn) and all_equal_across_clients(rest)
  bn_trained, _ = by_kind(trained['params'], models.is_bn)
  for a, b in zip(bn, bn_trained):
    np.testing.assert_array_equal(a, b)
  assert none_equal_across_clients(after['batch_stats'])


def test_siobn_shares_parameters_keeps_statistics():
  _, _, after, _, _ = one_round('siobn')
  assert all_equal_across_clients(after['params'])
  assert none_equal_across_clients(after['batch_stats'])


@pytest.mark.parametrize('method,local', [('fedper', models.is_head), ('lg_fedavg', models.is_body)])
def test_head_and_body_splits(method, local):
  _, _, after, _, _ = one_round(method)
  kept, shared = by_kind(after['params'], local)
  assert none_equal_across_clients(kept) and all_equal_across_clients(shared)
  # FedPer averages the BatchNorm statistics as FL-MedSegBench's server does; LG-FedAvg
  # keeps them with its local body.
  stats = jax.tree.leaves(after['batch_stats'])
  assert (all_equal_across_clients(stats) if method == 'fedper' else none_equal_across_clients(stats))


def test_fedrep_phases_freeze_the_right_part():
  # Head epochs only: the body must not move (it is then averaged, still equal to init).
  s0, trained, after, _, _ = one_round('fedrep', local_epochs=0)
  body0, _ = by_kind(s0['params'], models.is_body)
  body1, _ = by_kind(trained['params'], models.is_body)
  for a, b in zip(body0, body1):
    np.testing.assert_array_equal(a, b)
  head1, _ = by_kind(trained['params'], models.is_head)
  head0, _ = by_kind(s0['params'], models.is_head)
  assert all(not np.allclose(a, b) for a, b in zip(head0, head1))   # moved by ~lr, not by noise
  # Body epochs only: the head stays at its initial value.
  s0, trained, _, _, _ = one_round('fedrep', **{'fedrep.head_epochs': 0})
  for a, b in zip(by_kind(s0['params'], models.is_head)[0], by_kind(trained['params'], models.is_head)[0]):
    np.testing.assert_array_equal(a, b)


def test_ditto_personal_model_feels_the_pull():
  s0, loose, after, _, _ = one_round('ditto', **{'ditto.mu': 0.0})
  _, tight, _, _, _ = one_round('ditto', **{'ditto.mu': 1e4})
  assert all_equal_across_clients(after['params'])          # the global copy is FedAvg
  # Adam's first steps are +-lr whatever the gradient, so at Ditto's lr some tiny
  # leaves (BN biases) still agree across clients: require most leaves to differ.
  same = leaves_equal_across_clients(after['personal']['params'])
  assert sum(same) < len(same) / 2
  dist = lambda t: sum(float(jnp.sum((a - b) ** 2)) for a, b in
                       zip(jax.tree.leaves(t['personal']['params']), jax.tree.leaves(s0['params'])))
  assert dist(tight) < dist(loose)


def test_fedrod_personal_head_stays_local():
  s0, _, after, _, _ = one_round('fedrod')
  # FL-MedSegBench: the personal head starts as a copy of the generic head, the whole
  # model (BatchNorm statistics included) is averaged, the personal head never is.
  head = s0['params']['head']
  np.testing.assert_array_equal(s0['personal']['params']['kernel'],
                                head['kernel'].reshape(head['kernel'].shape[0], -1, 1))
  np.testing.assert_array_equal(s0['personal']['params']['bias'], head['bias'])
  assert all_equal_across_clients(after['params'])
  assert all_equal_across_clients(after['batch_stats'])
  assert none_equal_across_clients(after['personal']['params'])
  # The personal head is trained by plain SGD (no Adam moments), the model by Adam.
  mu = optax.tree_utils.tree_get(s0['personal']['opt'], 'mu')
  assert len(jax.tree.leaves(mu['model'])) == len(jax.tree.leaves(s0['params']))
  assert jax.tree.leaves(mu['phead']) == []


@pytest.mark.reference   # against numpy / another program
def test_fedcac_critical_entries():
  s0, trained, after, info, data = one_round('fedcac')
  # A real round's critical entries are the official rule's on |(theta - start) * theta|
  # (tests/test_fedcac.py checks the rules themselves on hand-made scores).
  for new, old, m in zip(jax.tree.leaves(trained['params']), jax.tree.leaves(s0['params']),
                         jax.tree.leaves(after['local_mask'])):
    new, old = np.asarray(new), np.asarray(old)
    for k in range(m.shape[0]):
      np.testing.assert_array_equal(m[k], ref_critical(np.abs((new[k] - old[k]) * new[k]), 0.5))
  # Non-critical entries get the weighted mean over all clients.
  w = np.asarray(data['train']['count'], np.float64)
  x = np.asarray(trained['params']['head']['kernel'], np.float64)
  mean = np.tensordot(w, x, 1) / w.sum()
  crit = np.asarray(after['local_mask']['head']['kernel'])
  got = np.asarray(after['params']['head']['kernel'])
  np.testing.assert_allclose(got[~crit], np.broadcast_to(mean, got.shape)[~crit], **mean_tol(x))
  assert np.all(np.asarray(info['collaborators']) >= 1)


@pytest.mark.reference   # against numpy / another program
def test_pfl_resfim_keeps_top_ratio_local_and_averages_the_rest():
  _, trained, after, info, data = one_round('pfl_resfim')
  mask = after['local_mask']
  for m in jax.tree.leaves(mask):
    for k in range(m.shape[0]):
      assert int(m[k].sum()) == masks.top_k_count(m[k].size, 0.2)
  # Against the plain rule of METHOD.md 4 written with numpy.
  w = np.asarray(data['train']['count'], np.float64)
  for theta, m, got in zip(jax.tree.leaves(trained['params']), jax.tree.leaves(mask),
                           jax.tree.leaves(after['params'])):
    theta, m, got = np.asarray(theta, np.float64), np.asarray(m), np.asarray(got)
    share = w.reshape(-1, *[1] * (theta.ndim - 1)) * ~m
    den = share.sum(0)
    g = np.where(den > 0, (share * theta).sum(0) / np.where(den > 0, den, 1), 0)
    want = np.where(m | (den == 0), theta, g)
    np.testing.assert_allclose(got, want, **mean_tol(theta))
  assert none_equal_across_clients(after['batch_stats'])
  np.testing.assert_allclose(info['local_fraction'], 0.2, atol=0.05)   # ceil(20%) per tensor
  # Per-module fractions (the report's heat map) agree with the mask.
  head = np.asarray(mask['head']['kernel']).reshape(mask['head']['kernel'].shape[0], -1)
  head_b = np.asarray(mask['head']['bias']).reshape(head.shape[0], -1)
  np.testing.assert_allclose(info['layer_fraction']['head'],   # one float32 division of counts
                             (head.sum(1) + head_b.sum(1)) / (head.shape[1] + head_b.shape[1]), rtol=EPS32)


  # Mean overlap with the other clients' masks (the evidence's agreement figure).
  flat = np.concatenate([np.asarray(m).reshape(m.shape[0], -1) for m in jax.tree.leaves(mask)], 1)
  want = [np.mean([(flat[i] & flat[j]).sum() / flat[i].sum() for j in range(3) if j != i])
          for i in range(3)]
  np.testing.assert_allclose(info['mask_overlap'], want, rtol=4 * EPS32)


@pytest.mark.parametrize('selector', ['fedcac', 'random'])
def test_pfl_resfim_selectors_without_fisher(selector):
  """resfim.selector: the same count per tensor, chosen by the selector's score."""
  start, trained, after, _, _ = one_round('pfl_resfim', **{'resfim.selector': selector})
  mask = after['local_mask']
  for m in jax.tree.leaves(mask):
    for k in range(m.shape[0]):
      assert int(m[k].sum()) == masks.top_k_count(m[k].size, 0.2)
  if selector == 'fedcac':   # |(theta - theta_start) * theta| of each client
    from test_selectors import ref_pick
    for t, s0, m in zip(jax.tree.leaves(trained['params']), jax.tree.leaves(start['params']),
                        jax.tree.leaves(mask)):
      t, s0 = np.asarray(t, np.float64), np.asarray(s0, np.float64)
      for k in range(t.shape[0]):
        score = np.abs((t[k] - s0[k]) * t[k])
        # float32 products may reorder near-ties: 99% of entries agree.
        assert np.mean(ref_pick(score, 0.2) == np.asarray(m[k])) >= 0.99
  else:   # a different draw for every client
    kernel = np.asarray(mask['enc2_1']['conv']['kernel']).reshape(3, -1)
    assert not np.array_equal(kernel[0], kernel[1])   # 29 of 144 entries each


@pytest.mark.reference   # three programs for the same Fisher
def test_pfl_resfim_fisher_conv_computes_the_same_fisher_another_way():
  """fisher.conv='im2col': ResFIM's two Fishers without a convolution in their program,
  equal to those of the model's own convolution ('auto': xla in these tests); and
  fisher.grads='layers' (its chunks batched, no per-example vmap) equal too."""
  got = {}
  for conv in ('auto', 'im2col', 'layers'):
    setting = {'fisher.grads': 'layers'} if conv == 'layers' else {'fisher.conv': conv}
    cfg, fed, algo, data, bank = setup('pfl_resfim', **setting)
    state = jax.jit(algo.init)(jax.random.PRNGKey(0))
    first = lambda t: jax.tree.map(lambda x: x[0], t)
    variables = {'params': first(state['params']), 'batch_stats': first(state['batch_stats'])}
    d, m = first(data['train']), cfg.fisher.num_examples
    batch = {'image': d['image'][:m], 'label': d['label'][:m], 'mask': jnp.arange(m) < d['count'],
             'key': jax.random.PRNGKey(3), 'style': bank['windows'], 'style_owner': bank['owner'],
             'client_id': jnp.int32(0)}
    program = str(jax.make_jaxpr(algo.method.fisher_pair)(variables, batch))
    assert ('conv_general_dilated' in program) == (conv != 'im2col')
    got[conv] = jax.jit(algo.method.fisher_pair)(variables, batch)
  # Per-example gradients are sums over 16x16 positions of products through the layers:
  # the two formulations order those sums differently; squares double the relative error.
  tol = 2 * sum_rtol(16 * 16 * 9 * 4)
  assert_tree_close(got['im2col'], got['auto'], rtol=tol, atol_rel=tol)
  assert_tree_close(got['layers'], got['auto'], rtol=tol, atol_rel=tol)


def test_pfl_resfim_warmup_is_fedavg():
  _, _, after, _, _ = one_round('pfl_resfim', **{'resfim.warmup_rounds': 5})
  assert all_equal_across_clients(after['params'])


@pytest.mark.reference   # against numpy / another program
@pytest.mark.parametrize('method', ['fedavg', 'ditto'])
def test_predict_uses_each_clients_model(method):
  """Algorithm.predict: the model a client is evaluated with (Ditto: the personal one)."""
  _, _, after, _, data = one_round(method)
  cfg, fed, algo, _, _ = setup(method)
  images = data['test']['image'][:, :2]
  got = np.asarray(jax.jit(algo.predict)(after, images))
  apply = models.inference_fn(algo_model(cfg))
  src = after['personal'] if method == 'ditto' else after
  for k in range(fed.num_clients):
    pick = lambda t: jax.tree.map(lambda x: x[k], t)
    want = apply(pick(src['params']), pick(src['batch_stats']), images[k])
    # Another program (vmapped over clients) for the same inference-mode UNet: each
    # conv sums up to 3 x 3 x 32 terms; 288 eps of the logits' scale.
    assert_tree_close(got[k], want, rtol=sum_rtol(288), atol_rel=sum_rtol(288))


def algo_model(cfg):
  return build.model(cfg)


# ------------------------------------------------------------------ the registry
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, 'examples', 'update_mask.py')


def test_registry_lists_the_builtins_in_table_order():
  from pflresfim_jax import config as config_lib
  assert methods.names()[:len(config_lib.METHODS)] == config_lib.METHODS
  assert all(issubclass(methods.get(m), methods.Method) for m in config_lib.METHODS)


def test_methods_load_from_a_file_or_module_and_bad_specs_name_the_field(tmp_path):
  spec = f'{EXAMPLE}:UpdateMask'
  cls = methods.get(spec)
  assert issubclass(cls, methods.Method) and spec in methods.names()
  assert methods.get(spec) is cls                       # loaded once
  assert methods.get('pflresfim_jax.methods.simple:FedBN') is methods.get('fedbn')
  for bad, why in ((f'{EXAMPLE}:Nope', 'has no attribute'), ('nowhere.py:X', 'not found'),
                   ('no_such_module_xyz:X', 'No module'), ('fedfoo', 'unknown method')):
    with pytest.raises(ValueError, match='config.method') as e:
      methods.get(bad)
    assert why in str(e.value)
  with pytest.raises(ValueError, match='not a Method'):
    methods.get('json:JSONDecoder')                    # a class, but not a Method
  with pytest.raises(ValueError, match='made a dict, not a Method'):
    setup('builtins:vars')   # any callable is a factory, but it must make a Method
  with pytest.raises(ValueError, match="'shared' or 'all'"):
    methods.Contract(params='some')
  with pytest.raises(ValueError, match='without commas'):
    methods.register('a,b', cls)


def test_example_method_runs_through_main(tmp_path):
  """README 'Add your own method': examples/update_mask.py by path, no package edit."""
  spec = f'{EXAMPLE}:UpdateMask'
  cmd = [sys.executable, os.path.join(ROOT, 'experiments', 'main.py'),
         f'--config={os.path.join(ROOT, "configs", "vessel.py")}', f'--workdir={tmp_path}',
         f'--config.method={spec}', '--config.rounds=2', '--config.local_epochs=1',
         '--config.model.base=2', '--config.model.levels=2', '--config.phantom.image_size=16', '--config.phantom.num_sites=2',
         '--config.eval.batch_size=4', '--config.report.enabled=false', '--config.model.conv=xla']
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = (tmp_path / 'results.csv').read_text().splitlines()
  assert rows[1].startswith(spec + ',')
  folder = tmp_path / build.method_folder(spec) / 'seed0'
  last = json.loads((folder / 'metrics.jsonl').read_text().splitlines()[-1])
  # ceil(10%) of each tensor's entries kept local: at least 10% overall, and per module.
  assert all(0.1 <= f < 0.35 for f in last['local_fraction'])
  assert set(last['layer_fraction']) >= {'head'}
