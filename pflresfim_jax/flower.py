"""Cross-institution deployment with Flower: ``client_app`` and ``server_app``.

Needs the optional extra: ``pip install -e '.[flower]'``. The apps carry the
messages of pflresfim_jax/deploy.py (the simulator's own pure functions split into a
hospital half and a server half) in Flower messages: a ConfigRecord 'meta' (JSON)
and an ArrayRecord 'arrays' keyed by pytree path. experiments/flower_app/ is the
Flower App (its pyproject.toml names these two objects and the run config).

Node config of a hospital's SuperNode (``--node-config``):
  client-index  its position in the federation, 0..K-1 (keys, style-bank owner id);
  data-root     its own data folder (config.data.name's layout, one client); without
                it the node plays phantom site ``client-index``;
  state-dir     where its state lives between rounds (default ~/.pflresfim/client<i>):
                parameters, optimizer state, personal leaves and masks never leave it.

Run config of the server (``flwr run ... --run-config``): config-file (a configs/*.py
path), overrides ('rounds=3;phantom.image_size=32'), method, seed, num-clients,
min-clients, round-timeout (s), wait-timeout (s, for the SuperNodes to connect),
workdir (where flower-result.json is written).
"""
from __future__ import annotations

import importlib.util
import json
import os
import time
from typing import Any, Dict, Tuple

import numpy as np

try:
  from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
  from flwr.clientapp import ClientApp
  from flwr.serverapp import Grid, ServerApp
except ImportError as e:  # pragma: no cover - depends on the environment
  raise ImportError("pflresfim_jax.flower needs Flower: pip install -e '.[flower]'") from e

from pflresfim_jax import build, compile_cache, deploy, methods, sweep

HELLO = 'hello'
KIND_TO_TYPE = {HELLO: 'query', deploy.QUERY: 'query', deploy.TRAIN: 'train',
                deploy.EVALUATE: 'evaluate'}


def to_content(kind: str, meta: Dict[str, Any], arrays: deploy.Flat) -> RecordDict:
  """(kind, meta, arrays) as a Flower RecordDict (0-d arrays travel as shape (1,))."""
  scalars = sorted(k for k, v in arrays.items() if np.ndim(v) == 0)
  return RecordDict({'meta': ConfigRecord({'json': json.dumps({**meta, 'kind': kind,
                                                                '_scalars': scalars})}),
                     'arrays': ArrayRecord({k: Array(np.ascontiguousarray(np.atleast_1d(v)))
                                            for k, v in arrays.items()})})


def from_content(content: RecordDict) -> Tuple[str, Dict[str, Any], deploy.Flat]:
  meta = json.loads(content['meta']['json'])
  scalars = set(meta.pop('_scalars', ()))
  arrays = {k: a.numpy().reshape(()) if k in scalars else a.numpy()
            for k, a in content['arrays'].items()}
  return meta.pop('kind', ''), meta, arrays


def load_config(path: str, overrides: str = ''):
  """A configs/*.py file's ``get_config()`` with 'field=value;...' overrides, resolved."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'run config config-file: {path} not found')
  spec = importlib.util.spec_from_file_location('pflresfim_run_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return build.resolve(sweep.override(module.get_config(), overrides, 'run config overrides'))


# ------------------------------------------------------------------ hospital side
client_app = ClientApp()


def _node(context: Context) -> Dict[str, Any]:
  nc = context.node_config
  if 'client-index' not in nc:
    raise ValueError("SuperNode --node-config needs client-index=<0..K-1>")
  index = int(nc['client-index'])
  state_dir = str(nc.get('state-dir') or os.path.expanduser(f'~/.pflresfim/client{index}'))
  root = str(nc.get('data-root') or '') or None
  return {'index': index, 'state_dir': state_dir, 'data_root': root,
          'client_name': str(nc.get('client-name') or '') or None}


def _use_compile_cache(state_dir: str) -> None:
  """Flower starts a fresh process per message: reuse compiled programs from disk."""
  compile_cache.enable(os.path.join(state_dir, 'jax-cache'), min_compile_secs=0.0)


def _answer(msg: Message, context: Context) -> Message:
  node = _node(context)
  kind, meta, arrays = from_content(msg.content)
  if kind == HELLO:
    return Message(to_content(HELLO, {'index': node['index']}, {}), reply_to=msg)
  _use_compile_cache(node['state_dir'])
  out_meta, out_arrays = deploy.handle(kind, meta, arrays, node['index'], node['state_dir'],
                                       node['data_root'], node['client_name'])
  return Message(to_content(kind, out_meta, out_arrays), reply_to=msg)


@client_app.query()
def _query(msg: Message, context: Context) -> Message:
  return _answer(msg, context)


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
  return _answer(msg, context)


@client_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
  return _answer(msg, context)


# ------------------------------------------------------------------ server side
server_app = ServerApp()


class GridTransport:
  """``deploy.serve``'s ``send`` over a Flower Grid: client index <-> SuperNode.

  SuperNodes are asked their client-index (a 'hello' message) when first seen, so a
  hospital that reconnects under a new node id is found again. A node that does not
  answer within ``timeout`` seconds, or answers with an error, is left out.
  """

  def __init__(self, grid: Grid, timeout: float, log=print):
    self.grid, self.timeout, self.log = grid, timeout, log
    self.node_of: Dict[int, int] = {}

  def _discover(self) -> None:
    live = set(self.grid.get_node_ids())
    self.node_of = {k: n for k, n in self.node_of.items() if n in live}
    unknown = live - set(self.node_of.values())
    if not unknown:
      return
    hello = [Message(to_content(HELLO, {}, {}), dst_node_id=n, message_type='query')
             for n in unknown]
    for reply in self.grid.send_and_receive(hello, timeout=self.timeout):
      if not reply.has_error():
        _, meta, _ = from_content(reply.content)
        self.node_of[int(meta['index'])] = reply.metadata.src_node_id

  def __call__(self, msgs):
    self._discover()
    index_of = {n: k for k, n in self.node_of.items()}
    out = [Message(to_content(kind, meta, arrays), dst_node_id=self.node_of[k],
                   message_type=KIND_TO_TYPE[kind])
           for k, (kind, meta, arrays) in msgs.items() if k in self.node_of]
    replies = {}
    for reply in self.grid.send_and_receive(out, timeout=self.timeout):
      k = index_of.get(reply.metadata.src_node_id)
      if reply.has_error():
        self.log(f'client {k}: {reply.error.reason}')
      elif k is not None:
        _, meta, arrays = from_content(reply.content)
        replies[k] = (meta, arrays)
    missing = sorted(set(msgs) - set(replies))
    if missing:
      self.log(f'no answer from client(s) {missing}')
    return replies


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
  rc = context.run_config
  config = load_config(str(rc['config-file']), str(rc.get('overrides', '')))
  method = str(rc.get('method') or config.method)
  methods.get(method)   # a registered name or module:Class, else a clear ValueError
  num_clients = int(rc['num-clients'])
  min_clients = int(rc.get('min-clients', num_clients))
  deadline = time.time() + float(rc.get('wait-timeout', 300))
  while len(list(grid.get_node_ids())) < min_clients:
    if time.time() > deadline:
      raise RuntimeError(f'only {len(list(grid.get_node_ids()))} SuperNodes connected, '
                         f'min-clients={min_clients}')
    time.sleep(1)
  transport = GridTransport(grid, float(rc.get('round-timeout', 600)))
  result = deploy.serve(config, method, int(rc.get('seed', 0)), num_clients, transport,
                        min_clients=min_clients, log=lambda text: print(text, flush=True))
  workdir = str(rc.get('workdir') or os.path.join('runs', 'flower'))
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'flower-result.json')
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump({'method': method, 'num_clients': num_clients, **result}, f, indent=1)
  os.replace(tmp, path)
  for k, name in enumerate(result['clients']):
    got = result['final'].get(k)
    print(f'{name or k}: ' + (f"test Dice {100 * got['test']['dice']:.2f} (round {got['round']})"
                              if got else 'no completed round'), flush=True)
  print(f'wrote {path}', flush=True)
