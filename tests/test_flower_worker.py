"""flower_worker: the hospital worker's door (only holders of the state folder's key get
in), its error replies, and its exit when idle or when its SuperNode is gone."""
import os
import subprocess
import sys
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client

import pytest

from pflresfim_jax import flower_client


def _start(state_dir, parent_pid, idle):
  address = flower_client.socket_path(str(state_dir))
  log = open(state_dir / 'worker.log', 'w')
  proc = subprocess.Popen([sys.executable, '-m', 'pflresfim_jax.flower_worker', '--state-dir',
                           str(state_dir), '--socket', address, '--parent-pid', str(parent_pid),
                           '--idle', str(idle)], stdout=log, stderr=subprocess.STDOUT)
  deadline = time.time() + 120
  while not os.path.exists(address):
    assert proc.poll() is None and time.time() < deadline, (state_dir / 'worker.log').read_text()
    time.sleep(0.1)
  return proc, address


def test_wrong_key_is_refused_errors_are_replies_and_idle_worker_exits(tmp_path):
  proc, address = _start(tmp_path, parent_pid=0, idle=4.0)
  try:
    with pytest.raises(AuthenticationError):
      Client(address, 'AF_UNIX', authkey=b'not the key')
    node = {'index': 0, 'state_dir': str(tmp_path), 'data_root': None, 'client_name': None}
    with Client(address, 'AF_UNIX', authkey=flower_client.authkey(str(tmp_path))) as conn:
      conn.send(('train', {}, {}, node))        # no config in the message
      status, payload = conn.recv()
    assert status == 'error' and payload.startswith("client 0: KeyError: 'config'")
    assert proc.wait(timeout=60) == 0          # idle for 4 s after the last message
  finally:
    if proc.poll() is None:
      proc.kill()
  assert not os.path.exists(address)
  log = (tmp_path / 'worker.log').read_text()
  assert log.count('listening on') == 1 and 'refused a connection' in log


def test_worker_exits_with_its_supernode(tmp_path):
  parent = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])
  proc, address = _start(tmp_path, parent_pid=parent.pid, idle=3600.0)
  try:
    parent.kill()
    parent.wait()
    assert proc.wait(timeout=60) == 0
  finally:
    for p in (proc, parent):
      if p.poll() is None:
        p.kill()
  assert not os.path.exists(address)
