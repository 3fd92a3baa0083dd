"""One round of a method split into what each hospital and what the server compute.

The simulator runs a round as one program over the stacked clients
(``methods.Algorithm.round``). A real federation runs the same pure functions on two
sides of a wire, and what crosses it is the method's declared ``Contract``
(methods/base.py); nothing here names a method:

* a :class:`Hospital` holds one client's data and state (parameters, optimizer
  state, personal leaves, masks) in its own folder; it runs the method's
  ``Algorithm.client`` (training and client statistics, e.g. ResFIM masks) and
  uploads the parameter entries the contract names, plus BatchNorm statistics
  when the contract shares them;
* the :class:`Server` stacks what arrives along the client axis (absent clients get
  weight 0), runs the method's ``aggregate`` and returns to each client the values of
  the same entries.

Messages are flat dicts of numpy arrays keyed by pytree path (``'params/Conv_0/kernel'``);
masks travel bit-packed. pflresfim_jax/flower.py carries these dicts in Flower
messages; the functions here do not import Flower.

Rounds and keys follow train.run_one exactly (same init key, ``fold_in(run_key, r)``,
the same per-client key splits), so with ``engine.client_axis='map'`` a deployment and
the simulator give the same per-client parameters up to float rounding
(tests/test_deploy.py).

A client's round, message by message: the server's message for round r carries the
values from the aggregation of the client's previous upload (if any) and asks for
round r. The client applies the values (completing that round), evaluates, then
trains round r from there and uploads. A last message completes the final round.
A client that misses a round keeps its own state and is simply not averaged in.
The spectral bank crosses the wire once per client: later messages carry its digest,
and the client keeps the bank in its state folder (sent again only to a client whose
last reply did not confirm it).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from pflresfim_jax import aggregate, build, methods, spectral
from pflresfim_jax.data import federation
from pflresfim_jax.methods import fedrdn

PyTree = Any
Flat = Dict[str, np.ndarray]
MASK = '#mask'    # suffix of a bit-packed boolean mask entry


# ------------------------------------------------------------------ wire format
def path_key(path) -> str:
  """``'params/Conv_0/kernel'`` for a jax.tree_util key path."""
  return '/'.join(str(getattr(p, 'key', getattr(p, 'idx', p))) for p in path)


def flatten(tree: PyTree) -> Flat:
  """``{path: np.ndarray}`` of a pytree."""
  return {path_key(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(template: PyTree, flat: Flat, what: str = 'message') -> PyTree:
  """The pytree of ``template``'s structure (arrays or ShapeDtypeStructs) with
  ``flat``'s leaves (shapes checked)."""
  leaves = []
  for p, x in jax.tree_util.tree_flatten_with_path(template)[0]:
    k = path_key(p)
    if k not in flat:
      raise ValueError(f'{what}: entry {k!r} missing')
    v = np.asarray(flat[k])
    if v.shape != tuple(x.shape):
      raise ValueError(f'{what}: entry {k!r} has shape {v.shape}, expected {tuple(x.shape)}')
    leaves.append(v.astype(x.dtype))
  return jax.tree.unflatten(jax.tree.structure(template), leaves)


def pack(tree: PyTree, send: PyTree, prefix: str) -> Flat:
  """The entries of ``tree`` where ``send`` is True, with the packed ``send`` mask.

  Args:
    tree: pytree of arrays (one client, no client axis).
    send: bool pytree like ``tree``.
    prefix: key prefix (e.g. 'params').
  """
  out = {}
  for (p, x), m in zip(jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(send)):
    k, m = f'{prefix}/{path_key(p)}', np.asarray(m, bool).reshape(-1)
    out[k] = np.asarray(x).reshape(-1)[m]
    out[k + MASK] = np.packbits(m)
  return out


def unpack(template: PyTree, flat: Flat, prefix: str, what: str = 'message'
           ) -> Tuple[PyTree, PyTree]:
  """Inverse of :func:`pack`: (values, zeros where not sent; the send mask)."""
  values, sent = [], []
  for p, x in jax.tree_util.tree_flatten_with_path(template)[0]:
    k = f'{prefix}/{path_key(p)}'
    if k not in flat or k + MASK not in flat:
      raise ValueError(f'{what}: entry {k!r} missing')
    size = int(np.prod(x.shape))
    m = _bits(flat[k + MASK], size, what, k)
    v = np.asarray(flat[k])
    if v.shape != (int(m.sum()),):
      raise ValueError(f'{what}: entry {k!r} holds {v.size} values for {int(m.sum())} entries')
    full = np.zeros(size, x.dtype)
    full[m] = v
    values.append(full.reshape(x.shape))
    sent.append(m.reshape(x.shape))
  treedef = jax.tree.structure(template)
  return jax.tree.unflatten(treedef, values), jax.tree.unflatten(treedef, sent)


def _bits(packed, size: int, what: str, key: str) -> np.ndarray:
  packed = np.asarray(packed, np.uint8)
  if packed.shape != ((size + 7) // 8,):
    raise ValueError(f'{what}: mask {key!r} has {packed.size} bytes for {size} entries')
  return np.unpackbits(packed, count=size).astype(bool)


def pack_mask(mask: PyTree, prefix: str) -> Flat:
  """A bool pytree as bit-packed uint8 entries (1 bit per parameter entry)."""
  return {f'{prefix}/{path_key(p)}': np.packbits(np.asarray(m, bool).reshape(-1))
          for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}


def unpack_mask(template: PyTree, flat: Flat, prefix: str, what: str = 'message') -> PyTree:
  leaves = []
  for p, x in jax.tree_util.tree_flatten_with_path(template)[0]:
    k = f'{prefix}/{path_key(p)}'
    if k not in flat:
      raise ValueError(f'{what}: entry {k!r} missing')
    leaves.append(_bits(flat[k], int(np.prod(x.shape)), what, k).reshape(x.shape))
  return jax.tree.unflatten(jax.tree.structure(template), leaves)


def under(prefix: str, flat: Flat) -> Flat:
  """The entries of ``flat`` below ``prefix/``, with the prefix removed."""
  start = prefix + '/'
  return {k[len(start):]: v for k, v in flat.items() if k.startswith(start)}


def prefixed(prefix: str, flat: Flat) -> Flat:
  """``flat`` with every key put below ``prefix/`` (inverse of :func:`under`)."""
  return {f'{prefix}/{k}': v for k, v in flat.items()}


def nbytes(flat: Flat) -> int:
  return int(sum(np.asarray(v).nbytes for v in flat.values()))


# ------------------------------------------------------------------ run state
def run_id(config, method: str, seed: int) -> str:
  """A short hash naming one run (config, method, seed): a client's state folder."""
  text = json.dumps({'config': config.to_dict(), 'method': method, 'seed': seed},
                    sort_keys=True, default=str)
  return f'{build.method_folder(method)}-seed{seed}-{hashlib.sha256(text.encode()).hexdigest()[:10]}'


def _save_npz(path: str, flat: Flat) -> None:
  tmp = path + '.tmp.npz'
  np.savez(tmp, **flat)
  os.replace(tmp, path)


def _load_npz(path: str) -> Optional[Flat]:
  if not os.path.exists(path):
    return None
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


def pad_examples(fed: federation.Federation, slots: Dict[str, int]) -> federation.Federation:
  """Zero-pad each split's example axis to ``slots[split]`` (counts unchanged)."""
  def pad(split, name):
    n = int(slots.get(name, split.images.shape[1]))
    if n < split.images.shape[1]:
      raise ValueError(f'{name}: {split.images.shape[1]} examples do not fit {n} slots')
    widths = [(0, 0), (0, n - split.images.shape[1])] + [(0, 0)] * 3
    return federation.Split(np.pad(split.images, widths), np.pad(split.labels, widths), split.counts)
  return dataclasses.replace(fed, **{s: pad(getattr(fed, s), s) for s in federation.SPLITS})


# ------------------------------------------------------------------ the client
class ClientPrograms:
  """A client's jitted functions for one config and method (no client data inside).

  ``init(key)``; ``client(state, train_data, bank, train_keys [1], stats_keys [1], rnd, client_ids [1])``
  -> (state, agg_mask, loss): the method's own ``Algorithm.client`` for one client
  (leading axis 1); ``evaluate(state, data)``. Data, keys and the client id are
  arguments, not constants, so every client of a federation runs the same program.
  """

  def __init__(self, config, method: str, image_shape: Sequence[int]):
    self.algo = build.algorithm(config, method, 1, image_shape)
    # One compiled init for every hospital of the process (models.init alone would
    # compile the model's init again for each).
    self.init = build.init_program(self.algo.init)
    self.client = jax.jit(self.algo.client)
    self.evaluate = jax.jit(self.algo.evaluate)


class Hospital:
  """One client: its own data (a one-client Federation) and state folder.

  Args:
    config: the resolved run config (build.resolve), as the server sends it.
    method: a registered method name or module:Class spec (methods.get).
    seed: run seed.
    fed: this hospital's data only (``fed.num_clients == 1``).
    index: this client's position in the federation (0..K-1): its keys and its
      owner id in the spectral bank.
    num_clients: K.
    state_dir: folder for this client's state (parameters, optimizer state,
      personal leaves, masks); it survives restarts of the client.
    programs: the jitted client functions (:class:`ClientPrograms`), shared by
      hospitals of one config in one process; built when not given.
    slots: per split, the example slots the simulator would stack this client's
      split into (the largest client's count): the shuffles and the ResFIM example
      draw depend on it (engine.epoch_order), so a client pads its own data to it.
  """

  def __init__(self, config, method: str, seed: int, fed: federation.Federation, index: int,
               num_clients: int, state_dir: str, slots: Optional[Dict[str, int]] = None,
               programs: Optional['ClientPrograms'] = None):
    if fed.num_clients != 1:
      raise ValueError(f'a hospital holds one client, got {fed.num_clients}')
    if not 0 <= index < num_clients:
      raise ValueError(f'client index {index} outside 0..{num_clients - 1}')
    self.config, self.method, self.seed = config, method, seed
    self.fed, self.index, self.num_clients = fed, index, num_clients
    self.folder = os.path.join(state_dir, run_id(config, method, seed))
    os.makedirs(self.folder, exist_ok=True)
    programs = programs or ClientPrograms(config, method, fed.image_shape)
    self.algo, self._init = programs.algo, programs.init
    self._client, self._evaluate = programs.client, programs.evaluate
    self.contract = self.algo.contract
    self.data = build.device_data(pad_examples(fed, slots or {}))
    self.k_init, self.k_run = methods.run_keys(seed)
    self._template = jax.eval_shape(self.algo.init, self.k_init)

  # -- state on disk: 'committed' (after the last applied aggregation) and
  #    'pending' (trained, waiting for the server's values of that round)
  def _path(self, which: str) -> str:
    return os.path.join(self.folder, f'{which}.npz')

  def _read(self, which: str):
    flat = _load_npz(self._path(which))
    if flat is None:
      return None, None, None
    state = unflatten(self._template, under('state', flat), self._path(which))
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype),
                          self._template['params'])
    agg = unpack_mask(params, flat, 'agg', self._path(which)) \
        if any(k.startswith('agg/') for k in flat) else None
    return state, int(flat['round']), agg

  def _write(self, which: str, state, rnd: int, agg_mask=None) -> None:
    flat = prefixed('state', flatten(state))
    if agg_mask is not None:
      flat.update(pack_mask(agg_mask, 'agg'))
    flat['round'] = np.asarray(rnd)
    _save_npz(self._path(which), flat)

  def committed(self) -> Tuple[PyTree, int]:
    """(state [1, ...], last round completed; -1 = fresh)."""
    state, rnd, _ = self._read('committed')
    if state is None:
      return self._init(self.k_init), -1
    return state, rnd

  # -- the two things a client is asked for
  def windows(self) -> Flat:
    """Its style: low-frequency amplitude windows of its training images (METHOD.md 2),
    and its per-channel mean and std where the method's contract asks (FedRDN)."""
    images, _ = self.fed.train.client(0)
    w = jnp.asarray(spectral.amplitude_windows(images, self.config.spectral.ratio))
    if self.config.spectral.share == 'client_mean':
      w, _ = spectral.client_mean_bank(w, jnp.zeros(w.shape[0], jnp.int32), 1)
    out = {'windows': np.asarray(w)}
    if self.contract.channel_stats:
      out.update(fedrdn.bank_entries(images))
    return out

  def complete(self, rnd: int, values: Optional[Flat]) -> Optional[Dict[str, Any]]:
    """Apply the server's values for round ``rnd`` to the pending state and evaluate.

    Returns the round's metrics ({'val': {...}, 'test': {...}}, numpy, per metric
    a float), or None when nothing was pending for that round (a stale message).
    """
    state, pending, agg_mask = self._read('pending')
    if state is None or pending != rnd or values is None:
      return None
    params = jax.tree.map(lambda x: x[0], state['params'])
    new, replaced = unpack(params, values, 'params', 'server values')
    expected = self.contract.sent(agg_mask)
    if any(np.any(a != b) for a, b in zip(jax.tree.leaves(replaced), jax.tree.leaves(expected))):
      raise ValueError(f'server values for round {rnd} do not match the entries this client shares')
    merged = jax.tree.map(lambda own, v, r: np.where(r, v, own), params, new, replaced)
    state = {**state, 'params': jax.tree.map(lambda x: x[None], merged)}
    if self.contract.batch_stats:
      stats = unflatten(jax.tree.map(lambda x: x[0], state['batch_stats']),
                        under('batch_stats', values), 'server values')
      state = {**state, 'batch_stats': jax.tree.map(lambda x: x[None], stats)}
    metrics = jax.tree.map(lambda v: float(np.asarray(v)[0]), self._evaluate(state, self.data))
    self._write('committed', state, rnd)
    os.remove(self._path('pending'))
    return metrics

  def style_bank(self, digest: str, sent: Flat) -> Flat:
    """The run's spectral bank: ``sent`` (the server sends it once) is kept in this
    client's folder under its digest; later messages name the digest only."""
    path = self._path('bank')
    if sent:
      _save_npz(path, {**sent, 'digest': np.asarray(digest)})
      return sent
    kept = _load_npz(path)
    if kept is None or str(kept.pop('digest')) != digest:
      raise ValueError(f'the style bank {digest} the server refers to is not in {path} '
                       '(the server sends it again with its next message)')
    return kept

  def train(self, rnd: int, bank: Dict[str, np.ndarray]) -> Flat:
    """Train round ``rnd`` from the committed state; return the upload.

    The upload holds the shared parameter entries (bit-packed mask + values), the
    mask kept local (for the server's mask statistics), BatchNorm statistics where
    the method averages them, the aggregation weight (aggregate.client_weights of the
    training-set size) and the loss.
    """
    state, done = self.committed()
    if done >= rnd:
      raise ValueError(f'round {rnd} asked, but this client already completed round {done}')
    train_keys, stats_keys = methods.client_keys(jax.random.fold_in(self.k_run, rnd),
                                                 self.num_clients)
    k_train, k_stats = train_keys[self.index], stats_keys[self.index]
    bank = {n: jnp.asarray(v) for n, v in bank.items()}
    state, agg_mask, loss = self._client(state, self.data['train'], bank, k_train[None],
                                         k_stats[None], jnp.int32(rnd), jnp.asarray([self.index]))
    one = lambda t: jax.tree.map(lambda x: np.asarray(x)[0], t)
    self._write('pending', state, rnd, one(agg_mask))
    params, agg = one(state['params']), one(agg_mask)
    out = pack(params, self.contract.sent(agg), 'params')
    out.update(pack_mask(agg, 'agg_mask'))
    out.update(pack_mask(one(state['local_mask']), 'local_mask'))
    if self.contract.batch_stats:
      out.update(prefixed('batch_stats', flatten(one(state['batch_stats']))))
    out['weight'] = np.asarray(aggregate.client_weights(
        self.fed.train.counts[:1], self.config.batch_size, self.config.aggregate_weights)[0])
    out['train_loss'] = np.asarray(np.asarray(loss)[0], np.float32)
    return out


# ------------------------------------------------------------------ the server
class Server:
  """The aggregation side: knows the model's shapes, never any data.

  Args:
    config: resolved run config.
    method: a registered method name or module:Class spec (methods.get).
    num_clients: K.
    image_shape: (H, W, C) of the federation (to build the parameter shapes).
    seed: run seed: a method with server state (Method.server_init) starts it from the
      initial model, as every client does.
  """

  def __init__(self, config, method: str, num_clients: int, image_shape: Sequence[int],
               seed: int = 0):
    self.config, self.method, self.num_clients = config, method, num_clients
    self.algo = build.algorithm(config, method, num_clients, image_shape)
    self.contract = self.algo.contract
    k_init, _ = methods.run_keys(seed)
    template = jax.eval_shape(self.algo.init, k_init)
    one = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), t)
    self.params = one(template['params'])
    self.batch_stats = one(template['batch_stats'])
    self.server_state = None   # one copy of state['server'], kept between rounds
    if 'server' in template:
      init = build.init_program(self.algo.init)(k_init)['server']
      self.server_state = jax.tree.map(lambda x: np.asarray(x)[0], init)
    self._aggregate = jax.jit(self.algo.aggregate)

  def bank(self, windows: Dict[int, Flat]) -> Dict[str, np.ndarray]:
    """The style bank from the clients' windows (client index -> its message), in
    client order: as build.spectral_bank, over the clients that replied."""
    parts, owner = [], []
    for k in sorted(windows):
      w = np.asarray(windows[k]['windows'], np.float32)
      parts.append(w)
      owner.append(np.full(len(w), k, np.int32))
    bank = {'windows': np.concatenate(parts), 'owner': np.concatenate(owner)}
    if self.contract.channel_stats:
      for n in ('channel_mean', 'channel_std'):
        missing = [k for k in sorted(windows) if n not in windows[k]]
        if missing:
          raise ValueError(f'style replies of clients {missing} lack {n!r}, which '
                           f'{self.method} needs (contract.channel_stats)')
        bank[n] = np.concatenate([np.asarray(windows[k][n], np.float32) for k in sorted(windows)])
    return bank

  def aggregate(self, rnd: int, uploads: Dict[int, Flat]
                ) -> Tuple[Dict[int, Flat], Dict[str, Any]]:
    """Round ``rnd``'s aggregation over the clients that sent an upload.

    Returns (values to send back per client index, info: per-client lists with
    None for absent clients: 'local_fraction', 'train_loss', ...).
    """
    k = self.num_clients
    zeros = lambda t: jax.tree.map(lambda s: np.zeros((k, *s.shape), s.dtype), t)
    params, stats = zeros(self.params), zeros(self.batch_stats)
    # Absent clients: everything 'local' (and weight 0), so no mean reads them.
    agg = jax.tree.map(lambda s: np.ones((k, *s.shape), bool), self.params)
    local = jax.tree.map(lambda s: np.zeros((k, *s.shape), bool), self.params)
    weights = np.zeros(k, np.float32)
    for i, up in uploads.items():
      what = f'client {i} upload, round {rnd}'
      v, _ = unpack(self.params, up, 'params', what)
      a = unpack_mask(self.params, up, 'agg_mask', what)
      lm = unpack_mask(self.params, up, 'local_mask', what)
      for tree, new in ((params, v), (agg, a), (local, lm)):
        jax.tree.map(lambda dst, src: dst.__setitem__(i, src), tree, new)
      if self.contract.batch_stats:
        s = unflatten(self.batch_stats, under('batch_stats', up), what)
        jax.tree.map(lambda dst, src: dst.__setitem__(i, src), stats, s)
      weights[i] = float(up['weight'])
    state = {'params': params, 'batch_stats': stats, 'local_mask': local}
    if self.server_state is not None:
      state['server'] = jax.tree.map(lambda x: np.broadcast_to(x, (k, *x.shape)),
                                     self.server_state)
    state, info = self._aggregate(state, agg, jnp.asarray(weights), jnp.int32(rnd))
    if self.server_state is not None:
      self.server_state = jax.tree.map(lambda x: np.asarray(x)[0], state['server'])
    out = {}
    for i in uploads:
      mine = lambda t: jax.tree.map(lambda x: np.asarray(x)[i], t)
      values = pack(mine(state['params']), self.contract.sent(mine(agg)), 'params')
      if self.contract.batch_stats:
        values.update(prefixed('batch_stats', flatten(mine(state['batch_stats']))))
      out[i] = values
    present = lambda arr: [float(arr[i]) if i in uploads else None for i in range(k)]
    record = {'clients': sorted(uploads),
              'train_loss': [float(uploads[i]['train_loss']) if i in uploads else None
                             for i in range(k)],
              'local_fraction': present(np.asarray(info['local_fraction']))}
    for extra in ('collaborators', 'mask_overlap'):
      if extra in info:
        record[extra] = present(np.asarray(info[extra]))
    return out, record


# ------------------------------------------------------------------ the protocol
# A message is (kind, meta, arrays): kind in QUERY / TRAIN / EVALUATE, meta a JSON-able
# dict, arrays a Flat dict. The transport (Flower, or a direct call in tests) only
# carries them; ``serve`` is the server's loop, ``handle`` a client's answer.
QUERY, TRAIN, EVALUATE = 'query', 'train', 'evaluate'


def config_from_json(text: str):
  import ml_collections
  return ml_collections.ConfigDict(json.loads(text))


def client_federation(config, index: int, data_root: Optional[str] = None,
                      client_name: Optional[str] = None) -> federation.Federation:
  """One hospital's data: its own folder (``data_root``, read with config.data.name's
  loader), or, without a folder, site ``index`` of the built-in phantom."""
  if data_root:
    cfg = config.copy_and_resolve_references()
    cfg.data.root = None
    cfg.data.clients = f'{client_name or os.path.basename(os.path.normpath(data_root))}={data_root}'
    return build.load_federation(cfg)
  fed = build.load_federation(config)
  if not 0 <= index < fed.num_clients:
    raise ValueError(f'client index {index}: the phantom has {fed.num_clients} sites '
                     '(config.phantom.num_sites)')
  pick = lambda s: federation.Split(s.images[index:index + 1], s.labels[index:index + 1],
                                    s.counts[index:index + 1])
  return federation.Federation(fed.name, (fed.clients[index],), pick(fed.train), pick(fed.val),
                               pick(fed.test))


def handle(kind: str, meta: Dict[str, Any], arrays: Flat, index: int, state_dir: str,
           data_root: Optional[str] = None, client_name: Optional[str] = None,
           cache: Optional[Dict[Any, Hospital]] = None) -> Tuple[Dict[str, Any], Flat]:
  """A client's answer to one server message (a function of the message, the
  client's node settings and its state folder).

  ``cache`` (optional, owned by the caller) keeps the client's data, its
  :class:`ClientPrograms` and :class:`Hospital` objects between messages of one process
  (keys: tuples whose first item is the client index, 'federation' or 'programs').
  """
  slots = meta.get('slots')
  key = (index, state_dir, data_root, meta['config'], meta['method'], meta['seed'],
         json.dumps(slots))
  cache = {} if cache is None else cache
  hospital = cache.get(key)
  if hospital is None:
    config = config_from_json(meta['config'])
    fed_key = ('federation', index, data_root, client_name, meta['config'])
    if fed_key not in cache:
      cache[fed_key] = client_federation(config, index, data_root, client_name)
    fed = cache[fed_key]
    programs_key = ('programs', meta['config'], meta['method'], fed.image_shape)
    if programs_key not in cache:
      cache[programs_key] = ClientPrograms(config, meta['method'], fed.image_shape)
    hospital = cache[key] = Hospital(config, meta['method'], int(meta['seed']), fed, index,
                                     int(meta['num_clients']), state_dir, slots,
                                     cache[programs_key])
  fed = hospital.fed
  if kind == QUERY:
    counts = {s: int(getattr(fed, s).counts[0]) for s in federation.SPLITS}
    return {'index': index, 'name': fed.clients[0], 'image_shape': list(fed.image_shape),
            'counts': counts}, hospital.windows()
  out: Dict[str, Any] = {'index': index}
  if meta.get('complete') is not None:
    done = int(meta['complete'])
    out['completed'], out['metrics'] = done, hospital.complete(done, under('values', arrays))
  if kind == EVALUATE:
    return out, {}
  if kind != TRAIN:
    raise ValueError(f'unknown message kind {kind!r}')
  out['round'] = int(meta['round'])
  out['bank'] = meta['bank']    # the digest: this client holds the bank from now on
  bank = hospital.style_bank(meta['bank'], under('bank', arrays))
  return out, hospital.train(int(meta['round']), bank)


def serve(config, method: str, seed: int, num_clients: int, send, min_clients: int = 1,
          log=None) -> Dict[str, Any]:
  """The server's whole run over any transport.

  Args:
    config: resolved run config (sent to every client with each message).
    method, seed: what to run.
    num_clients: K (client indices 0..K-1).
    send: ``send({index: (kind, meta, arrays)}) -> {index: (meta, arrays)}``; a client
      that did not answer (disconnected, timed out, failed) is left out of the result.
    min_clients: a round needs at least this many uploads, else RuntimeError.
    log: optional callable(str) for progress lines.

  Returns:
    {'clients': names, 'rounds': [per-round records, with the round's wall 'seconds'
    as the server saw it], 'final': {index: metrics of the
    last round the client completed}, 'wire': bytes per message kind}.
  """
  log = log or (lambda text: None)
  wire = {'query_down': 0, 'query_up': 0, 'train_down': 0, 'train_up': 0}

  def count(direction, msgs):
    wire[direction] += sum(nbytes(m[-1]) for m in msgs.values())

  def need(replies, what):
    if len(replies) < min_clients:
      raise RuntimeError(f'{what}: {len(replies)} of {num_clients} clients answered, '
                         f'fewer than min_clients={min_clients}')

  base = {'config': json.dumps(config.to_dict()), 'method': method, 'seed': seed,
          'num_clients': num_clients}
  server, bank_arrays, names = _style_exchange(config, base, send, count, need, log)
  holds_bank = set()     # clients whose last training reply confirmed the bank
  outbox: Dict[int, Tuple[int, Flat]] = {}
  rounds, final = [], {}

  def with_outbox(k, meta, arrays):
    if k in outbox:
      done, values = outbox[k]
      meta = {**meta, 'complete': done}
      arrays = {**arrays, **prefixed('values', values)}
    return meta, arrays

  def collect(replies, record_by_round):
    for k, (m, _) in replies.items():
      outbox.pop(k, None)
      if m.get('metrics') is not None:
        final[k] = {'round': m['completed'], **m['metrics']}
        record_by_round.setdefault(m['completed'], {})[k] = m['metrics']

  metrics_by_round: Dict[int, Dict[int, Any]] = {}
  for rnd in range(config.rounds):
    start = time.monotonic()
    msgs = {}
    for k in range(num_clients):
      meta, arrays = with_outbox(k, {**base, 'round': rnd}, {} if k in holds_bank else bank_arrays)
      msgs[k] = (TRAIN, meta, arrays)
    count('train_down', msgs)
    replies = send(msgs)
    holds_bank = {k for k, (m, _) in replies.items() if m.get('bank') == base['bank']}
    count('train_up', replies)
    collect(replies, metrics_by_round)
    need(replies, f'round {rnd}')
    values, record = server.aggregate(rnd, {k: a for k, (_, a) in replies.items()})
    outbox.update({k: (rnd, v) for k, v in values.items()})
    rounds.append({'round': rnd, **record, 'seconds': time.monotonic() - start})
    log(f'round {rnd}: {len(replies)} clients')
  last = {k: (EVALUATE, *with_outbox(k, dict(base), {})) for k in outbox}
  collect(send(last) if last else {}, metrics_by_round)
  for rec in rounds:
    _add_dice(rec, metrics_by_round.get(rec['round'], {}), num_clients)
  return {'clients': [names.get(k) for k in range(num_clients)], 'rounds': rounds,
          'final': final, 'wire': wire}


def _style_exchange(config, base: Dict[str, Any], send, count, need, log):
  """The first message: each client's name, image shape, split sizes and amplitude
  windows, from which the server draws the style bank.

  Args:
    config, send, log: as :func:`serve`'s; count(direction, msgs) adds up the bytes
      on the wire; need(replies, what) raises when too few clients answered.
    base: the metadata every message carries; gains 'slots' (example slots per split,
      what the simulator pads every client to) and 'bank' (the bank's hash).

  Returns:
    (the Server, the bank as message arrays, {index: client name}).
  """
  num_clients = base['num_clients']
  replies = send({k: (QUERY, dict(base), {}) for k in range(num_clients)})
  count('query_up', replies)
  need(replies, 'style exchange')
  shapes = {tuple(m['image_shape']) for m, _ in replies.values()}
  if len(shapes) != 1:
    raise ValueError(f'clients disagree on the image shape: {sorted(shapes)}')
  names = {k: m['name'] for k, (m, _) in replies.items()}
  base['slots'] = {s: max(m['counts'][s] for m, _ in replies.values()) for s in federation.SPLITS}
  server = Server(config, base['method'], num_clients, shapes.pop(), base['seed'])
  bank = server.bank({k: a for k, (_, a) in replies.items()})
  base['bank'] = hashlib.sha256(b''.join(np.ascontiguousarray(bank[n]).tobytes()
                                         for n in sorted(bank))).hexdigest()[:16]
  log(f'style exchange: {len(replies)} clients, bank of {len(bank["owner"])} windows')
  return server, prefixed('bank', bank), names


def _add_dice(record: Dict[str, Any], got: Dict[int, Any], num_clients: int) -> None:
  """A round's record gains 'val_dice' / 'test_dice' per client (None: not completed)."""
  for split in ('val', 'test'):
    record[f'{split}_dice'] = [got[k][split]['dice'] if k in got else None
                               for k in range(num_clients)]
