"""A hospital's long-lived worker: ``python -m pflresfim_jax.flower_worker``.

Started by the Flower client app (pflresfim_jax/flower_client.py) with a hospital's
first message, it answers every later message of that hospital through
``deploy.handle`` with one cache: JAX is imported once, the data loaded once, the
client programs compiled once, and the style bank kept. It listens on a Unix socket
that only clients holding ``<state-dir>/worker.key`` may use, and exits when its
SuperNode exits or after ``--idle`` seconds without a message.
"""
from __future__ import annotations

import argparse
import os
import threading
import time
from multiprocessing.connection import Listener
from multiprocessing import AuthenticationError

from pflresfim_jax import compile_cache, deploy
from pflresfim_jax.flower_client import authkey


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _watch(parent_pid: int, idle: float, clock: dict, address: str) -> None:
  """Exit the process when the SuperNode is gone or nothing came for ``idle`` s."""
  while True:
    time.sleep(1.0)
    quiet = not clock['busy'] and time.monotonic() - clock['last'] > idle
    if quiet or (parent_pid > 0 and not _alive(parent_pid)):
      if os.path.exists(address):
        os.remove(address)
      os._exit(0)


def serve(state_dir: str, address: str, parent_pid: int = 0, idle: float = 3600.0) -> None:
  """Answer messages on ``address`` until the watchdog ends the process."""
  compile_cache.enable(os.path.join(state_dir, 'jax-cache'), min_compile_secs=0.0)
  listener = Listener(address, 'AF_UNIX', authkey=authkey(state_dir))
  os.chmod(address, 0o600)
  clock = {'busy': False, 'last': time.monotonic()}
  threading.Thread(target=_watch, args=(parent_pid, idle, clock, address), daemon=True).start()
  print(f'hospital worker {os.getpid()} listening on {address} '
        f'(XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r})', flush=True)
  cache: dict = {}
  while True:
    try:
      conn = listener.accept()
    except (AuthenticationError, EOFError, OSError) as e:
      print(f'refused a connection: {e}', flush=True)
      continue
    clock['busy'] = True
    try:
      with conn:
        kind, meta, arrays, node = conn.recv()
        try:
          reply = ('ok', deploy.handle(kind, meta, arrays, node['index'], node['state_dir'],
                                       node['data_root'], node['client_name'], cache=cache))
        except Exception as e:    # the server sees it as this client's error reply
          reply = ('error', f'client {node["index"]}: {type(e).__name__}: {e}')
        conn.send(reply)
    except (EOFError, OSError) as e:
      print(f'lost a connection: {e}', flush=True)
    finally:
      clock['busy'], clock['last'] = False, time.monotonic()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--state-dir', required=True)
  parser.add_argument('--socket', required=True)
  parser.add_argument('--parent-pid', type=int, default=0)
  parser.add_argument('--idle', type=float, default=3600.0)
  args = parser.parse_args()
  serve(os.path.abspath(args.state_dir), args.socket, args.parent_pid, args.idle)


if __name__ == '__main__':
  main()
