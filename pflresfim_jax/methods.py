"""The federated methods of METHOD.md 6 as (init, round) pairs over stacked client state.

``build(name, ctx)`` returns an :class:`Algorithm`: ``init(key) -> state`` and
``round(state, data, bank, key, rnd) -> (state, metrics)``, a pure function jitted
once by the caller. ``state`` is a dict of pytrees with a leading client axis:

* 'params', 'batch_stats': the model each client trains (for Ditto: the copy of
  the global model; for FedRoD: the shared body + generic head);
* 'opt': optimizer states by phase ('main', or 'head' and 'body' for FedRep);
* 'local_mask': bool like 'params', True = entry kept local in the last aggregation;
* 'personal': method extras (Ditto's personal model, FedRoD's personal head).

One round = local training -> method statistics (ResFIM, FedCAC's critical
entries) -> aggregation (METHOD.md 4's masked mean for every mask-based method) ->
evaluation of the model each client would use, on its val and test splits.
BatchNorm running statistics stay local except in FedAvg, FedProx and Ditto's
global model, which average them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from pflresfim_jax import aggregate, evaluation, losses, masks, models, resfim
from pflresfim_jax.clients import engine
from pflresfim_jax.config import METHODS

Array = jax.Array
PyTree = Any

# Methods whose BatchNorm running statistics are averaged on the server.
SHARED_STATS = ('fedavg', 'fedprox', 'ditto')
# Methods whose local mask changes from round to round: their metrics carry the
# fraction kept local per module ('layer_fraction': {module: [K]}).
DYNAMIC_MASKS = ('pfl_resfim', 'fedcac')


class Algorithm(NamedTuple):
  """A method: ``round`` is ``local`` then ``server`` then evaluation.

  init(key) -> state
  round(state, data, bank, key, rnd) -> (state, metrics)
  local(state, train_data, client_keys [K], lr) -> (state, train_loss [K])
  server(state, start_params, data, bank, client_keys [K], rnd) -> (state, info)
  predict(state, images [K, N, H, W, C]) -> logits [K, N, H, W, 1] of the model each
    client uses (Ditto: its personal model; FedRoD: generic + personal head)

  ``server`` is ``stats`` (what each client computes on its own data after training)
  then ``aggregate`` (what the server computes from what the clients send), so a real
  deployment (pflresfim_jax/flower.py) runs the same two halves on either side:
  stats(state, start_params, train_data, bank, client_keys [K], rnd, client_ids [K])
    -> (state with its new 'local_mask', agg_mask: bool like 'params', True = the
       entry takes no part in this round's mean)
  aggregate(state, agg_mask, weights [K], rnd) -> (state, info)
  evaluate(state, data) -> {'val': {...}, 'test': {...}} per client
  """
  init: Callable[[Array], Dict[str, PyTree]]
  round: Callable[..., Tuple[Dict[str, PyTree], Dict[str, Array]]]
  local: Callable[..., Tuple[Dict[str, PyTree], Array]]
  server: Callable[..., Tuple[Dict[str, PyTree], Dict[str, Array]]]
  predict: Callable[[Dict[str, PyTree], Array], Array]
  stats: Callable[..., Tuple[Dict[str, PyTree], PyTree]]
  aggregate: Callable[..., Tuple[Dict[str, PyTree], Dict[str, Array]]]
  evaluate: Callable[..., Dict[str, Dict[str, Array]]]


@dataclasses.dataclass(frozen=True, eq=False)
class Context:
  """Static facts a method is built from.

  Attributes:
    model: the Flax segmentation model.
    num_clients: K (padded clients included; they have zero weight).
    image_shape: (H, W, C).
    config: the resolved run config (see pflresfim_jax.config).
    rounds: T, for the learning-rate schedule and FedCAC's threshold.
    mesh: optional Mesh the client axis is split over (clients/sharding.py); K is a
      multiple of its size.
  """
  model: Any
  num_clients: int
  image_shape: Tuple[int, int, int]
  config: ml_collections.ConfigDict
  rounds: int
  mesh: Any = None

  @property
  def strategy(self) -> str:
    return engine.resolve_client_axis(self.config.engine.client_axis)


def run_keys(seed: int) -> Tuple[Array, Array]:
  """(init key, run key) of a run; round r uses ``fold_in(run_key, r)``."""
  k_init, k_run = jax.random.split(jax.random.PRNGKey(seed))
  return k_init, k_run


def client_keys(round_key: Array, k_clients: int) -> Tuple[Array, Array]:
  """One round's per-client keys: (training [K], statistics [K]).

  The simulator's round and a deployed client (deploy.py) both draw from here, so
  client k gets the same randomness on either path.
  """
  k_train, k_server = jax.random.split(round_key)
  return jax.random.split(k_train, k_clients), jax.random.split(k_server, k_clients)


def lr_factor(config, rounds: int, rnd: Array) -> Array:
  """The schedule: 'step' halves the rate every T/4 rounds, 'constant' keeps it."""
  if config.lr_schedule == 'constant':
    return jnp.ones((), jnp.float32)
  if config.lr_schedule == 'step':
    period = max(1, rounds // 4)
    return 0.5 ** (rnd // period).astype(jnp.float32)
  raise ValueError(f"lr_schedule must be 'step' or 'constant', got {config.lr_schedule!r}")


def _sqdist(a: PyTree, b: PyTree) -> Array:
  return sum(jnp.sum(jnp.square(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _stack(tree: PyTree, k: int) -> PyTree:
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (k, *x.shape)), tree)


def _where_tree(pred, a, b):
  return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def _personal_head(phead: PyTree, feat: Array) -> Array:
  """FedRoD's personal head: a 1x1 conv on the last decoder feature ``[N,H,W,2n]``."""
  return jnp.einsum('nhwc,co->nhwo', feat, phead['kernel']) + phead['bias']


def build(name: str, ctx: Context) -> Algorithm:
  """The :class:`Algorithm` for method ``name`` (one of config.METHODS)."""
  if name not in METHODS:
    raise ValueError(f'config.method must be among {METHODS} (or all), got {name!r}')
  cfg, model, k_clients = ctx.config, ctx.model, ctx.num_clients
  strategy = ctx.strategy

  def over_clients(fn, *stacked):
    return engine.map_clients(fn, strategy, *stacked, mesh=ctx.mesh)
  unroll = engine.resolve_unroll(cfg.engine.unroll)
  tx = engine.optimizer(cfg.weight_decay)
  base_loss = engine.seg_loss(model)
  apply_eval = models.inference_fn(model)

  def plain_loss(params, stats, batch, mask, aux):
    return base_loss(params, stats, batch, mask)

  def prox_loss(mu):
    def loss(params, stats, batch, mask, anchor):
      l, s = base_loss(params, stats, batch, mask)
      return l + 0.5 * mu * _sqdist(params, anchor), s
    return loss

  def rod_loss(params, stats, batch, mask, aux):
    (logits, feat), upd = model.apply({'params': params['model'], 'batch_stats': stats},
                                      batch['image'], train=True, mask=mask, features=True,
                                      mutable=['batch_stats'])
    generic = losses.dice_bce_loss(logits, batch['label'], mask)
    personal_logits = jax.lax.stop_gradient(logits) + _personal_head(
        params['phead'], jax.lax.stop_gradient(feat))
    personal = losses.dice_bce_loss(personal_logits, batch['label'], mask)
    return generic + personal, upd['batch_stats']

  def train_clients(step, carry, aux, data, keys, lr, epochs):
    def one(c, a, d, k):
      return engine.local_train(step, c, a, d, k, lr, epochs, cfg.batch_size,
                                cfg.augment.flip, cfg.augment.rot90, unroll)
    return over_clients(one, carry, aux, data, keys)

  # ---------------------------------------------------------------- init
  def init(key):
    params, stats = models.init(model, key, ctx.image_shape)
    head, body = masks.head(params), masks.body(params)
    if name == 'fedrep':
      opt = {'head': tx.init(params), 'body': tx.init(params)}
    elif name == 'fedrod':
      opt = {}  # FedRoD's optimizer covers model and personal head: in 'personal'
    else:
      opt = {'main': tx.init(params)}
    static_mask = {
        'local': masks.constant(params, True), 'fedbn': masks.batchnorm(params),
        'fedper': head, 'fedrep': head, 'lg_fedavg': body,
    }.get(name, masks.constant(params, False))
    personal = {}
    if name == 'ditto':
      personal = {'params': params, 'batch_stats': stats, 'opt': tx.init(params)}
    elif name == 'fedrod':
      width = params[models.HEAD]['kernel'].shape[-2]
      phead = {'kernel': jnp.zeros((width, 1), jnp.float32), 'bias': jnp.zeros((1,), jnp.float32)}
      personal = {'params': phead, 'opt': tx.init({'model': params, 'phead': phead})}
    state = {'params': params, 'batch_stats': stats, 'opt': opt, 'local_mask': static_mask,
             'personal': personal}
    return _stack(state, k_clients)

  # ---------------------------------------------------------------- training
  def train(state, data, keys, lr):
    carry = (state['params'], state['batch_stats'])
    if name == 'fedrep':
      head = masks.head(jax.tree.map(lambda x: x[0], state['params']))
      body = jax.tree.map(lambda m: ~m, head)
      h_step = engine.sgd_step(plain_loss, tx, trainable=head)
      (p, s, oh), loss_h = train_clients(h_step, (*carry, state['opt']['head']), None, data,
                                         keys, lr, cfg.fedrep.head_epochs)
      b_step = engine.sgd_step(plain_loss, tx, trainable=body)
      b_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
      (p, s, ob), loss = train_clients(b_step, (p, s, state['opt']['body']), None, data,
                                       b_keys, lr, cfg.local_epochs)
      return {**state, 'params': p, 'batch_stats': s, 'opt': {'head': oh, 'body': ob}}, loss
    if name == 'fedrod':
      step = engine.sgd_step(rod_loss, tx)
      both = {'model': state['params'], 'phead': state['personal']['params']}
      (both, s, o), loss = train_clients(step, (both, state['batch_stats'], state['personal']['opt']),
                                         None, data, keys, lr, cfg.local_epochs)
      return {**state, 'params': both['model'], 'batch_stats': s,
              'personal': {'params': both['phead'], 'opt': o}}, loss
    if name == 'fedprox':
      step, aux = engine.sgd_step(prox_loss(cfg.fedprox.mu), tx), state['params']
    else:
      step, aux = engine.sgd_step(plain_loss, tx), None
    (p, s, o), loss = train_clients(step, (*carry, state['opt']['main']), aux, data, keys, lr,
                                    cfg.local_epochs)
    new = {**state, 'params': p, 'batch_stats': s, 'opt': {'main': o}}
    if name == 'ditto':
      # The personal model v feels a proximal pull towards the round's global model.
      per = state['personal']
      v_step = engine.sgd_step(prox_loss(cfg.ditto.mu), tx)
      v_keys = jax.vmap(lambda k: jax.random.fold_in(k, 2))(keys)
      (vp, vs, vo), loss = train_clients(
          v_step, (per['params'], per['batch_stats'], per['opt']), state['params'], data, v_keys,
          lr * cfg.ditto.lr / cfg.lr, cfg.local_epochs)
      new['personal'] = {'params': vp, 'batch_stats': vs, 'opt': vo}
    return new, loss

  # ---------------------------------------------------------------- server
  f = cfg.fisher
  estimate_resfim = resfim.estimator(
      model, loss=f.loss, residual=cfg.resfim.residual,
      chunk_size=engine.resolve_fisher_chunk(f.chunk_size, unroll),
      spectral_ratio=cfg.spectral.ratio, lam_range=(cfg.spectral.lam_min, cfg.spectral.lam_max),
      eps=cfg.resfim.eps, unroll=unroll)

  def resfim_masks(state, data, bank, keys, client_ids):
    nmax = data['image'].shape[1]
    m = min(int(f.num_examples), nmax)

    def one(params, stats, d, k, client_id, bank):
      k_pick, k_sim = jax.random.split(k)
      order = engine.epoch_order(k_pick, d['count'], nmax, nmax)[:m]
      batch = {'image': d['image'][order], 'label': d['label'][order],
               'mask': jnp.arange(m) < d['count'], 'key': k_sim,
               'style': bank['windows'], 'style_owner': bank['owner'], 'client_id': client_id}
      r = estimate_resfim({'params': params, 'batch_stats': stats}, batch)
      return resfim.partition(r, cfg.resfim.ratio, cfg.resfim.scope)
    # The (small) bank goes to every client as an argument, not a closure: inside a
    # shard_map over devices a closed-over sharded array cannot be indexed.
    return over_clients(one, state['params'], state['batch_stats'], data, keys, client_ids,
                        _stack(bank, k_clients))

  def fedcac(params, crit, weights, rnd):
    c = cfg.fedcac
    both = sum(jnp.einsum('i...,j...->ij', m.reshape(k_clients, -1).astype(jnp.float32),
                          m.reshape(k_clients, -1).astype(jnp.float32))
               for m in jax.tree.leaves(crit))
    overlap = both / jnp.maximum(jnp.diag(both)[:, None], 1.0)
    present = weights > 0
    pair = present[:, None] & present[None, :] & ~jnp.eye(k_clients, dtype=bool)
    lo = jnp.min(jnp.where(pair, overlap, jnp.inf))
    hi = jnp.max(jnp.where(pair, overlap, -jnp.inf))
    threshold = lo + (hi - lo) * rnd.astype(jnp.float32) / c.beta
    collab = ((overlap >= threshold) & pair) | jnp.eye(k_clients, dtype=bool)
    shared = aggregate.fedavg(params, weights)
    grouped = aggregate.group_mean(params, collab, weights)
    return jax.tree.map(lambda m, g, s: jnp.where(m, g, s), crit, grouped, shared), collab

  def stats(state, start, train_data, bank, keys, rnd, client_ids):
    """Client side of the server step: each client's new mask from its own data."""
    if name == 'fedcac':
      # Critical entries: the tau fraction with the largest |update * new value|.
      sens = jax.tree.map(lambda new, old: jnp.abs((new - old) * new), state['params'], start)
      crit = jax.vmap(lambda s: masks.top_fraction(s, cfg.fedcac.tau, 'tensor'))(sens)
      return {**state, 'local_mask': crit}, crit
    mask = state['local_mask']
    if name == 'pfl_resfim':
      rc = cfg.resfim
      due = (rnd >= rc.warmup_rounds) & ((rnd - rc.warmup_rounds) % rc.every == 0)
      fresh = lambda: resfim_masks(state, train_data, bank, keys, client_ids)
      if unroll:
        # XLA:CPU is slow on gradients inside a conditional's branch (as in loops):
        # estimate every round and select.
        mask = _where_tree(due, fresh(), mask)
      else:
        mask = jax.lax.cond(due, fresh, lambda: mask)
      # Warm-up rounds are plain FedAvg; the mask is kept for later rounds.
      state = {**state, 'local_mask': mask}
      mask = _where_tree(rnd < rc.warmup_rounds, jax.tree.map(jnp.zeros_like, mask), mask)
    return state, mask

  def aggregate_fn(state, agg_mask, weights, rnd):
    """Server side: pure over the stacked clients (absent clients have weight 0)."""
    info = {}
    if name == 'fedcac':
      params, collab = fedcac(state['params'], agg_mask, weights, rnd)
      state = {**state, 'params': params}
      info['collaborators'] = collab.sum(1)
    elif name != 'local':
      state = {**state, 'params': aggregate.masked_mean(state['params'], agg_mask, weights)}
    if name in SHARED_STATS:
      state = {**state, 'batch_stats': aggregate.fedavg(state['batch_stats'], weights)}
    info['local_fraction'] = jax.vmap(masks.fraction_true)(state['local_mask'])
    if name in DYNAMIC_MASKS:
      info['layer_fraction'] = jax.vmap(masks.module_fractions)(state['local_mask'])
    return state, info

  def server(state, start, data, bank, keys, rnd):
    state, agg_mask = stats(state, start, data['train'], bank, keys, rnd, jnp.arange(k_clients))
    return aggregate_fn(state, agg_mask, data['train']['count'].astype(jnp.float32), rnd)

  # ---------------------------------------------------------------- evaluation
  def predictor(params, stats, personal):
    if name == 'ditto':
      return lambda x: apply_eval(personal['params'], personal['batch_stats'], x)
    if name == 'fedrod':
      def predict(x):
        logits, feat = model.apply({'params': params, 'batch_stats': stats}, x, train=False,
                                   features=True)
        return logits + _personal_head(personal['params'], feat)
      return predict
    return lambda x: apply_eval(params, stats, x)

  def evaluate(state, data):
    def one(params, stats, personal, val, test):
      predict = predictor(params, stats, personal)
      ev = lambda d: evaluation.evaluate(predict, d['image'], d['label'], d['count'],
                                         cfg.eval.batch_size, cfg.eval.threshold)
      return {'val': ev(val), 'test': ev(test)}
    return over_clients(one, state['params'], state['batch_stats'], state['personal'],
                        data['val'], data['test'])

  def round_fn(state, data, bank, key, rnd):
    lr = cfg.lr * lr_factor(cfg, ctx.rounds, rnd)
    train_keys, stats_keys = client_keys(key, k_clients)
    start = state['params']
    state, train_loss = train(state, data['train'], train_keys, lr)
    state, info = server(state, start, data, bank, stats_keys, rnd)
    metrics = evaluate(state, data)
    return state, {**metrics, **info, 'train_loss': train_loss}

  def predict(state, images):
    def one(params, stats, personal, x):
      return predictor(params, stats, personal)(x)
    return over_clients(one, state['params'], state['batch_stats'], state['personal'], images)

  return Algorithm(init, round_fn, train, server, predict, stats, aggregate_fn, evaluate)
