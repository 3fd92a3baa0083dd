"""The hospital side of the Flower deployment: ``client_app``, and the wire format.

Flower starts a fresh process for every message a SuperNode receives. So this module
imports no JAX: it hands each message to the hospital's long-lived worker
(pflresfim_jax/flower_worker.py), which keeps JAX, the hospital's data, its compiled
programs and the style bank between messages, and starts that worker with the first
message. A round then costs what the simulator's round costs plus transport.

Node config of a hospital's SuperNode (``--node-config``):
  client-index  its position in the federation, 0..K-1 (keys, style-bank owner id);
  data-root     its own data folder (config.data.name's layout, one client); without
                it the node plays phantom site ``client-index``;
  state-dir     where its state lives between rounds (default ~/.pflresfim/client<i>):
                parameters, optimizer state, personal leaves and masks never leave it;
  worker-idle   seconds the worker waits for the next message before it exits
                (default 3600); it also exits with its SuperNode.

The worker listens on a Unix socket only this user can reach, and both sides prove
they hold ``<state-dir>/worker.key`` (created 0600) before anything is exchanged.
Messages: a Flower RecordDict with a ConfigRecord 'meta' (JSON) and an ArrayRecord
'arrays' keyed by pytree path.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Client
from typing import Any, Dict, Tuple

import numpy as np

try:
  from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
  from flwr.clientapp import ClientApp
except ImportError as e:  # pragma: no cover - depends on the environment
  raise ImportError("pflresfim_jax.flower needs Flower: pip install -e '.[flower]'") from e

Flat = Dict[str, np.ndarray]
HELLO = 'hello'


def to_content(kind: str, meta: Dict[str, Any], arrays: Flat) -> RecordDict:
  """(kind, meta, arrays) as a Flower RecordDict (0-d arrays travel as shape (1,))."""
  scalars = sorted(k for k, v in arrays.items() if np.ndim(v) == 0)
  return RecordDict({'meta': ConfigRecord({'json': json.dumps({**meta, 'kind': kind,
                                                                '_scalars': scalars})}),
                     'arrays': ArrayRecord({k: Array(np.ascontiguousarray(np.atleast_1d(v)))
                                            for k, v in arrays.items()})})


def from_content(content: RecordDict) -> Tuple[str, Dict[str, Any], Flat]:
  meta = json.loads(content['meta']['json'])
  scalars = set(meta.pop('_scalars', ()))
  arrays = {k: a.numpy().reshape(()) if k in scalars else a.numpy()
            for k, a in content['arrays'].items()}
  return meta.pop('kind', ''), meta, arrays


def node_settings(context: Context) -> Dict[str, Any]:
  """The hospital's node config (see the module docstring), checked."""
  nc = context.node_config
  if 'client-index' not in nc:
    raise ValueError("SuperNode --node-config needs client-index=<0..K-1>")
  index = int(nc['client-index'])
  state_dir = os.path.abspath(str(nc.get('state-dir') or
                                  os.path.expanduser(f'~/.pflresfim/client{index}')))
  return {'index': index, 'state_dir': state_dir,
          'data_root': str(nc.get('data-root') or '') or None,
          'client_name': str(nc.get('client-name') or '') or None,
          'idle': float(nc.get('worker-idle', 3600))}


# ------------------------------------------------------------------ the worker's door
def socket_path(state_dir: str) -> str:
  """The worker's Unix socket (short, under the temp folder: socket paths have a
  ~100-byte limit; one per state folder)."""
  tag = hashlib.sha256(os.path.realpath(state_dir).encode()).hexdigest()[:16]
  return os.path.join(tempfile.gettempdir(), f'pflresfim-worker-{tag}.sock')


def authkey(state_dir: str) -> bytes:
  """The secret both ends of the worker's socket prove they hold (created 0600)."""
  os.makedirs(state_dir, exist_ok=True)
  path = os.path.join(state_dir, 'worker.key')
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, 'w') as f:
      f.write(secrets.token_hex(32))
  except FileExistsError:
    pass
  with open(path) as f:
    return f.read().strip().encode()


def _connect(node, start_timeout: float = 300.0):
  """A connection to the hospital's worker, starting it if none answers."""
  address, key = socket_path(node['state_dir']), authkey(node['state_dir'])
  try:
    return Client(address, 'AF_UNIX', authkey=key)
  except (FileNotFoundError, ConnectionRefusedError):
    pass
  with open(os.path.join(node['state_dir'], 'worker.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)       # one start at a time per state folder
    try:
      return Client(address, 'AF_UNIX', authkey=key)
    except (FileNotFoundError, ConnectionRefusedError):
      pass
    if os.path.exists(address):
      os.remove(address)                  # left by a worker that died
    log_path = os.path.join(node['state_dir'], 'worker.log')
    with open(log_path, 'a') as log:
      worker = subprocess.Popen(
          [sys.executable, '-m', 'pflresfim_jax.flower_worker', '--state-dir', node['state_dir'],
           '--socket', address, '--parent-pid', str(os.getppid()), '--idle', str(node['idle'])],
          stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + start_timeout
    while time.time() < deadline:
      if worker.poll() is not None:
        raise RuntimeError(f'the hospital worker exited ({worker.returncode}): '
                           + open(log_path).read()[-2000:])
      try:
        return Client(address, 'AF_UNIX', authkey=key)
      except (FileNotFoundError, ConnectionRefusedError):
        time.sleep(0.1)
    raise RuntimeError(f'the hospital worker did not open {address} in {start_timeout:.0f} s '
                       f'(see {log_path})')


def ask_worker(node: Dict[str, Any], kind: str, meta: Dict[str, Any], arrays: Flat
               ) -> Tuple[Dict[str, Any], Flat]:
  """The worker's answer to one server message (deploy.handle there)."""
  with _connect(node) as conn:
    conn.send((kind, meta, arrays, node))
    status, payload = conn.recv()
  if status != 'ok':
    raise RuntimeError(payload)
  return payload


# ------------------------------------------------------------------ the app
client_app = ClientApp()


def _answer(msg: Message, context: Context) -> Message:
  node = node_settings(context)
  kind, meta, arrays = from_content(msg.content)
  if kind == HELLO:
    return Message(to_content(HELLO, {'index': node['index']}, {}), reply_to=msg)
  out_meta, out_arrays = ask_worker(node, kind, meta, arrays)
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
