"""Stopping a run on Ctrl-C / SIGTERM within seconds, without losing a finished round.

A round is one compiled program: at the reference setting on a CPU it runs for
minutes and cannot be interrupted from Python. Batch systems do not wait that long
(Slurm sends SIGKILL 30 s after SIGTERM by default). So the training runs in a worker
thread while the main thread only waits for signals (:meth:`StopFlag.run`):

1. on a signal, the round in flight gets ``grace`` seconds to finish; if it does, the
   worker checkpoints it and stops (:class:`Interrupted`);
2. otherwise the main thread writes the checkpoint of the last *completed* round from
   the copy the worker left with :meth:`StopFlag.remember` and stops at once; the
   round in flight is abandoned (a resume trains it again from that checkpoint, so
   the results are those of an uninterrupted run);
3. a second signal skips the rest of the grace period.

The worker does its per-round bookkeeping (metrics line, checkpoint, the copy) under
:meth:`StopFlag.round_end`, which the main thread takes before its own save, so the
two never write at once and nothing is written after the main thread gave up.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)


class Interrupted(Exception):
  """A stop signal arrived: the last completed round was checkpointed.

  ``signum`` is the signal (the process exits with 128 + signum, like a shell).
  """

  def __init__(self, message: str, signum: int = signal.SIGINT):
    super().__init__(message)
    self.signum = int(signum)


class StopFlag:
  """SIGINT / SIGTERM as a request to stop, honoured within ``grace`` seconds.

  Use as a context manager around :meth:`run`. The worker asks ``requested`` between
  rounds, and hands over a way to save its last completed round with
  :meth:`remember` (``None`` when that round is already on disk).
  """

  def __init__(self, grace: float = 20.0):
    self.grace = float(grace)
    self.requested = False
    self.signum = signal.SIGINT
    self.abandoned = False      # the main thread gave up on the worker
    self._since: Optional[float] = None
    self._urgent = False
    self._save: Optional[Callable[[], str]] = None
    self._lock = threading.Lock()
    self._old = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    return False

  def _handle(self, signum, frame):
    if self.requested:
      self._urgent = True
      return
    self.requested, self.signum, self._since = True, signum, time.monotonic()
    log.warning('%s received: the round in flight gets %.0f s to finish, then the last '
                'completed round is saved and the run stops (send it again to stop now)',
                signal.Signals(signum).name, self.grace)

  @contextlib.contextmanager
  def round_end(self):
    """Held by the worker while it records a finished round; raises Interrupted if the
    main thread has already given up (nothing more may be written)."""
    with self._lock:
      if self.abandoned:
        raise Interrupted('abandoned by the main thread', self.signum)
      yield

  def remember(self, save: Optional[Callable[[], str]]) -> None:
    """``save()`` makes sure the checkpoint of the last completed round is on disk and
    returns its folder (``None``: there is no way to save it, e.g. a multi-process
    run). Call inside :meth:`round_end`."""
    self._save = save

  def forget(self) -> None:
    """The worker's checkpointer is closing: the main thread must not save any more."""
    with self._lock:
      self._save = None

  def run(self, fn: Callable[..., Any], *args) -> Any:
    """``fn(*args)`` in a worker thread, the main thread watching for stop signals.

    Raises:
      Interrupted: stopped by a signal (from the worker after a graceful stop, or
        from here once the grace period ran out).
    """
    if threading.current_thread() is not threading.main_thread():
      return fn(*args)
    box = {}

    def work():
      try:
        box['value'] = fn(*args)
      except BaseException as e:   # handed to the main thread
        box['error'] = e

    worker = threading.Thread(target=work, name='pflresfim-train', daemon=True)
    worker.start()
    while worker.is_alive():
      worker.join(0.1)
      if worker.is_alive() and self.requested and (
          self._urgent or time.monotonic() - self._since > self.grace):
        self._give_up()
    if 'error' in box:
      raise box['error']
    return box['value']

  def _give_up(self):
    with self._lock:
      self.abandoned = True
      where = self._save() if self._save is not None else None
    raise Interrupted(
        'the round in flight was abandoned; ' + (f'the last completed round was saved in {where}; '
                                                 if where else '')
        + 'run the same command again to resume', self.signum)
