"""Cross-institution deployment with Flower: the server side, ``server_app``.

Needs the optional extra: ``pip install -e '.[flower]'``. The apps carry the
messages of pflresfim_jax/deploy.py (the simulator's own pure functions split into a
hospital half and a server half) in Flower messages. The hospital side,
``client_app``, is pflresfim_jax/flower_client.py (light: it imports no JAX and hands
each message to the hospital's long-lived worker, pflresfim_jax/flower_worker.py).
experiments/flower_app/ is the Flower App (its pyproject.toml names the two apps and
the run config).

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
from typing import Dict

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from pflresfim_jax import build, deploy, methods, sweep
# The wire format and the hospital's app (re-exported: flower.client_app, flower.to_content).
from pflresfim_jax.flower_client import HELLO, client_app, from_content, to_content

__all__ = ['GridTransport', 'client_app', 'from_content', 'load_config', 'server_app', 'to_content']

KIND_TO_TYPE = {HELLO: 'query', deploy.QUERY: 'query', deploy.TRAIN: 'train',
                deploy.EVALUATE: 'evaluate'}


def load_config(path: str, overrides: str = ''):
  """A configs/*.py file's ``get_config()`` with 'field=value;...' overrides, resolved."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'run config config-file: {path} not found')
  spec = importlib.util.spec_from_file_location('pflresfim_run_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return build.resolve(sweep.override(module.get_config(), overrides, 'run config overrides'))


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
