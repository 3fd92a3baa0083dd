"""The protocol every federated method implements, and the round built from it.

A method is a :class:`Method`: settings bound once from a :class:`Context`, then pure
functions over a state dict whose every leaf has a leading client axis ``K``:

* 'params', 'batch_stats': the model each client trains (Ditto: its copy of the
  global model; FedRoD: the shared body + generic head);
* 'opt': optimizer states by phase ('main'; FedRep: 'head' and 'body');
* 'local_mask': bool like 'params', True = entry kept local in the last aggregation;
* 'personal': what only the client has (Ditto's personal model, FedRoD's head);
* 'server' (only for a method whose :meth:`Method.server_init` returns something):
  what the server keeps between rounds (FedNova: the last global model), identical
  on every client slot; clients never read it, and a deployed server keeps one copy.
* 'inbox' (transient): what :meth:`Method.receive` took from the style bank for this
  round (FedRDN: every client's channel statistics); dropped after client_stats.

The parts, in the order of a round::

  init(key) -> state
  receive(state, data, bank, ids [K]) -> state                         client
  train(state, data, keys [K], rnd) -> (state, loss [K])               client
  client_stats(state, start, data, bank, keys [K], rnd, ids [K])
      -> (state, agg_mask)   agg_mask: True = not in this round's mean  client
  aggregate(state, agg_mask, weights [K], rnd) -> (state, info)        server
  predictor(params, batch_stats, personal) -> (images -> logits)       client

and ``contract`` (:class:`Contract`), what crosses the wire between the two sides.
The defaults are FedAvg with nothing shared but the parameters: a method overrides
the parts it changes. :func:`compose` turns a method into the jittable
:class:`Algorithm` the trainer (simulation) and deploy.py (one client per process)
both run, so the two cannot drift apart.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pflresfim_jax import aggregate, evaluation, masks, models
from pflresfim_jax.clients import engine

Array = jax.Array
PyTree = Any
State = Dict[str, PyTree]


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


@dataclasses.dataclass(frozen=True)
class Contract:
  """What a method sends over the wire (deploy.py and flower.py read only this).

  Every upload also carries the client's ``agg_mask``, its ``local_mask`` (for the
  server's statistics), its aggregation weight (aggregate.client_weights) and its
  training loss.

  Attributes:
    params: the parameter entries a client uploads, and gets back after the mean:
      'shared' = those outside its agg_mask; 'all' = every entry (FedCAC mixes even
      the critical ones among collaborators).
    batch_stats: True = BatchNorm running statistics are uploaded and replaced by
      the server's weighted mean.
    private: state entries that never leave the client.
    channel_stats: True = the style bank also carries every client's per-channel
      image mean and std (FedRDN), not only its amplitude windows.
  """
  params: str = 'shared'
  batch_stats: bool = False
  private: Tuple[str, ...] = ('opt', 'personal')
  channel_stats: bool = False

  def __post_init__(self):
    if self.params not in ('shared', 'all'):
      raise ValueError(f"Contract.params must be 'shared' or 'all', got {self.params!r}")

  def sent(self, agg_mask: PyTree) -> PyTree:
    """Bool pytree like ``agg_mask`` (one client, numpy): the entries uploaded and
    replaced."""
    if self.params == 'all':
      return jax.tree.map(lambda m: np.ones(np.shape(m), bool), agg_mask)
    return jax.tree.map(lambda m: ~np.asarray(m, bool), agg_mask)


class Method:
  """FedAvg of the parameters, BatchNorm statistics kept local (SiloBN): the base
  every method refines. See the module docstring for the protocol."""

  contract = Contract()
  dynamic_mask = False   # True: metrics carry 'layer_fraction' (the mask changes by round)

  def __init__(self, ctx: Context):
    self.ctx, self.config, self.model = ctx, ctx.config, ctx.model
    self.num_clients = ctx.num_clients
    self.strategy = engine.resolve_client_axis(ctx.config.engine.client_axis)
    self.unroll = engine.resolve_unroll(ctx.config.engine.unroll)
    self.tx = engine.optimizer(ctx.config.weight_decay)
    self.schedule = engine.round_schedule(ctx.config, ctx.rounds)
    self.loss = engine.seg_loss(ctx.model)
    self.apply_eval = models.inference_fn(ctx.model)

  # ------------------------------------------------------------- the protocol
  def init(self, key: Array) -> State:
    client = self.init_client(key)
    server = self.server_init(client)
    return masks.stack({**client, 'server': server} if server else client, self.num_clients)

  def init_client(self, key: Array) -> State:
    """One client's state (no client axis); every client starts from the same one."""
    params, stats = models.init(self.model, key, self.ctx.image_shape)
    return {'params': params, 'batch_stats': stats, 'opt': {'main': self.tx.init(params)},
            'local_mask': self.static_mask(params), 'personal': {}}

  def server_init(self, client: State) -> PyTree:
    """What the server keeps between rounds, from a client's initial state (no client
    axis); :meth:`aggregate` reads and replaces ``state['server']``. Default: nothing."""
    return {}

  def static_mask(self, params: PyTree) -> PyTree:
    """The entries kept local every round (bool like params)."""
    return masks.constant(params, False)

  def receive(self, state: State, data, bank, client_ids: Array) -> State:
    """What a client takes from the style bank before training (the bank of
    build.spectral_bank: 'windows', 'owner', and with ``contract.channel_stats``
    'channel_mean'/'channel_std' [R, C]). Anything put under 'inbox' is dropped after
    the round's client_stats. Default: nothing."""
    return state

  def train(self, state: State, data, keys: Array, rnd: Array) -> Tuple[State, Array]:
    """``config.local_epochs`` of Adam on :attr:`loss` from the last aggregation."""
    step = engine.train_step(self.loss, self.tx)
    carry = (state['params'], state['batch_stats'], state['opt']['main'])
    (p, s, o), loss = self.train_clients(step, carry, self.loss_aux(state), data, keys,
                                         self.learning_rate(rnd), self.config.local_epochs)
    return {**state, 'params': p, 'batch_stats': s, 'opt': {'main': o}}, loss

  def loss_aux(self, state: State) -> PyTree:
    """The round constant :attr:`loss` receives as ``aux`` (FedProx: the start params)."""
    return None

  def client_stats(self, state: State, start: PyTree, data, bank, keys: Array, rnd: Array,
                   client_ids: Array) -> Tuple[State, PyTree]:
    """What a client computes on its own data after training: (state, agg_mask)."""
    return state, state['local_mask']

  def aggregate(self, state: State, agg_mask: PyTree, weights: Array, rnd: Array
                ) -> Tuple[State, Dict[str, Array]]:
    """The server: :meth:`mix` the parameters, average BatchNorm statistics where the
    contract shares them; info has 'local_fraction' [K] (and 'layer_fraction').

    A deployed server (deploy.Server) holds only what the contract sends: 'params'
    (zeros outside the uploaded entries), 'batch_stats' (zeros unless shared),
    'local_mask' and 'server' (its own, where the method has one); an override must
    read nothing else of the state.
    """
    params, info = self.mix(state['params'], agg_mask, weights, rnd)
    state = {**state, 'params': params}
    if self.contract.batch_stats:
      state = {**state, 'batch_stats': aggregate.fedavg(state['batch_stats'], weights)}
    info.update(local_fraction(state))
    if self.dynamic_mask:
      info['layer_fraction'] = jax.vmap(masks.module_fractions)(state['local_mask'])
      info['mask_overlap'] = _mean_overlap(masks.overlap(state['local_mask']), weights > 0)
    return state, info

  def mix(self, params: PyTree, agg_mask: PyTree, weights: Array, rnd: Array
          ) -> Tuple[PyTree, Dict[str, Array]]:
    """METHOD.md 4: the weighted mean over clients of every entry outside agg_mask."""
    return aggregate.masked_mean(params, agg_mask, weights), {}

  def predictor(self, params: PyTree, batch_stats: PyTree, personal: PyTree) -> Callable:
    """The model ONE client segments with: ``images [N,H,W,C] -> logits [N,H,W,1]``."""
    return lambda x: self.apply_eval(params, batch_stats, x)

  # ------------------------------------------------------------- helpers
  def learning_rate(self, rnd: Array) -> Array:
    return jnp.asarray(self.schedule(rnd), jnp.float32)

  def over_clients(self, fn: Callable, *stacked):
    """``fn`` on every client's slice (engine.map_clients with the run's strategy)."""
    return engine.map_clients(fn, self.strategy, *stacked, mesh=self.ctx.mesh)

  def train_clients(self, step, carry, aux, data, keys, lr, epochs):
    """engine.local_train of every client: ``carry``, ``aux``, ``data``, ``keys`` stacked."""
    cfg = self.config

    def one(c, a, d, k):
      return engine.local_train(step, c, a, d, k, lr, epochs, cfg.batch_size,
                                cfg.augment.flip, cfg.augment.rot90, self.unroll)
    return self.over_clients(one, carry, aux, data, keys)


def local_fraction(state: State) -> Dict[str, Array]:
  """``{'local_fraction': [K]}``: each client's fraction of entries kept local, the
  info every aggregation reports (an override of Method.aggregate returns it too)."""
  return {'local_fraction': jax.vmap(masks.fraction_true)(state['local_mask'])}


class Algorithm(NamedTuple):
  """A method as the jittable functions the trainer and deploy.py call.

  init(key) -> state [K, ...]
  round(state, data, bank, key, rnd) -> (state, metrics): client, aggregate, evaluate
  client(state, train_data, bank, train_keys [K], stats_keys [K], rnd, client_ids [K])
    -> (state, agg_mask, train_loss [K]): everything a client does in a round
  aggregate(state, agg_mask, weights [K], rnd) -> (state, info): the server
  evaluate(state, data) -> {'val': {...}, 'test': {...}} per client
  predict(state, images [K, N, H, W, C]) -> logits [K, N, H, W, 1]
  contract: the method's :class:`Contract`
  method: the :class:`Method` itself
  """
  init: Callable
  round: Callable
  client: Callable
  aggregate: Callable
  evaluate: Callable
  predict: Callable
  contract: Contract
  method: Method


def compose(method: Method) -> Algorithm:
  """The round of METHOD.md 5 from a method's parts."""
  k_clients, cfg = method.num_clients, method.config

  def client(state, train_data, bank, train_keys, stats_keys, rnd, client_ids):
    start = state['params']
    state = method.receive(state, train_data, bank, client_ids)
    state, loss = method.train(state, train_data, train_keys, rnd)
    state, agg_mask = method.client_stats(state, start, train_data, bank, stats_keys, rnd,
                                          client_ids)
    return {n: v for n, v in state.items() if n != 'inbox'}, agg_mask, loss

  def evaluate(state, data):
    def one(params, stats, personal, val, test):
      predict = method.predictor(params, stats, personal)
      ev = lambda d: evaluation.evaluate(predict, d['image'], d['label'], d['count'],
                                         cfg.eval.batch_size, cfg.eval.threshold)
      return {'val': ev(val), 'test': ev(test)}
    return method.over_clients(one, state['params'], state['batch_stats'], state['personal'],
                               data['val'], data['test'])

  def round_fn(state, data, bank, key, rnd):
    train_keys, stats_keys = client_keys(key, k_clients)
    previous = state['local_mask']
    state, agg_mask, loss = client(state, data['train'], bank, train_keys, stats_keys, rnd,
                                   jnp.arange(k_clients))
    weights = aggregate.client_weights(data['train']['count'], cfg.batch_size,
                                       cfg.aggregate_weights)
    state, info = method.aggregate(state, agg_mask, weights, rnd)
    if method.dynamic_mask:   # how much of each client's local set carried over
      info['mask_kept'] = masks.kept(previous, state['local_mask'])
    return state, {**evaluate(state, data), **info, 'train_loss': loss}

  def predict(state, images):
    def one(params, stats, personal, x):
      return method.predictor(params, stats, personal)(x)
    return method.over_clients(one, state['params'], state['batch_stats'], state['personal'],
                               images)

  return Algorithm(init=method.init, round=round_fn, client=client, aggregate=method.aggregate,
                   evaluate=evaluate, predict=predict, contract=method.contract, method=method)


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


def _mean_overlap(overlap: Array, present: Array) -> Array:
  """``[K]``: client k's mean overlap (masks.overlap row) with the other present clients."""
  pair = present[:, None] & present[None, :] & ~jnp.eye(present.shape[0], dtype=bool)
  return jnp.sum(jnp.where(pair, overlap, 0.0), 1) / jnp.maximum(pair.sum(1), 1)


def where_tree(pred, a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)
