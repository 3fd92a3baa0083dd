"""stopping: a signal stops the run within the grace period, saving the last completed
round exactly once (the worker here stands in for the training loop; a blocked wait
stands in for a round running inside XLA)."""
import os
import signal
import threading
import time

import pytest

from pflresfim_jax.stopping import Interrupted, StopFlag


def _signal_later(sig, after):
  threading.Timer(after, os.kill, (os.getpid(), sig)).start()


def test_no_signal_returns_the_value_and_errors_pass_through():
  with StopFlag(grace=0.0) as stop:
    assert stop.run(lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(ZeroDivisionError):
      stop.run(lambda: 1 / 0)
  assert not stop.requested


def test_a_round_that_finishes_in_time_stops_the_worker_itself():
  saved = []

  def rounds(stop):
    for rnd in range(1000):
      time.sleep(0.02)                                   # a short round
      with stop.round_end():
        stop.remember(lambda rnd=rnd: saved.append(('main', rnd)) or 'dir')
      if stop.requested:
        saved.append(('worker', rnd))
        raise Interrupted(f'stopped after round {rnd}', stop.signum)
    return 'finished'

  with StopFlag(grace=30.0) as stop:
    _signal_later(signal.SIGTERM, 0.2)
    with pytest.raises(Interrupted, match='stopped after round') as got:
      stop.run(rounds, stop)
  assert got.value.signum == signal.SIGTERM
  assert [who for who, _ in saved] == ['worker']          # the main thread saved nothing


@pytest.mark.parametrize('grace,signals', [(0.3, 1), (60.0, 2)], ids=['grace', 'second-signal'])
def test_a_long_round_is_abandoned_after_the_grace_period(grace, signals):
  saved, release = [], threading.Event()
  after_give_up = []

  def rounds(stop):
    with stop.round_end():
      stop.remember(lambda: saved.append(0) or '/ckpt')   # round 0 completed
    release.wait(60)                                       # round 1: stuck in "XLA"
    try:
      with stop.round_end():
        after_give_up.append('wrote')
    except Interrupted:
      after_give_up.append('refused')

  with StopFlag(grace=grace) as stop:
    for i in range(signals):
      _signal_later(signal.SIGINT, 0.1 + 0.1 * i)
    start = time.monotonic()
    with pytest.raises(Interrupted, match='abandoned; the last completed round was saved in /ckpt'):
      stop.run(rounds, stop)
    took = time.monotonic() - start
  release.set()
  deadline = time.monotonic() + 10
  while not after_give_up and time.monotonic() < deadline:
    time.sleep(0.01)
  assert saved == [0]                                      # saved once, by the main thread
  assert after_give_up == ['refused']                      # the worker may write nothing more
  assert took < (2.0 if signals == 2 else grace + 2.0), took


def test_forget_leaves_nothing_to_save():
  release = threading.Event()

  def rounds(stop):
    with stop.round_end():
      stop.remember(lambda: pytest.fail('saved after forget'))
    stop.forget()
    release.wait(60)

  with StopFlag(grace=0.0) as stop:
    _signal_later(signal.SIGTERM, 0.1)
    with pytest.raises(Interrupted) as got:
      stop.run(rounds, stop)
  release.set()
  assert 'saved in' not in str(got.value)
