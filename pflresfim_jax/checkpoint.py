"""Checkpoints of a federated run, and the checks that make resuming safe.

One run (one method, one seed) keeps its checkpoints in ``<run dir>/checkpoints``
with an orbax ``CheckpointManager``. A checkpoint holds

* 'state': the whole federated state (stacked client states, server state, masks,
  optimizer states: the pytree a method's ``round`` carries);
* 'bank': the spectral bank {'windows', 'owner'};
* 'meta' (JSON): the round it was taken after, the run key, and the best-val
  bookkeeping of METHOD.md 7 ('best_val', 'best_round', 'recorded').

Orbax writes each step into a temporary folder and renames it when complete, so a
run killed mid-save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from typing import Any, Dict, Iterable, List, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any

# Config fields that do not change what a run computes: a workdir may be resumed
# with other values for them.
RESUME_IGNORES = ('method', 'seeds', 'resume', 'checkpoint', 'report', 'data.cache_dir',
                  'tensorboard', 'distributed', 'cluster', 'compile_cache')


class Checkpointer:
  """Save / restore a run's state every ``every`` rounds, keeping the last ``keep``."""

  def __init__(self, directory: str, every: int, keep: int):
    if every < 1:
      raise ValueError(f'config.checkpoint.every must be >= 1, got {every}')
    if keep < 1:
      raise ValueError(f'config.checkpoint.keep must be >= 1, got {keep}')
    self.directory, self.every = os.path.abspath(directory), every
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest(self) -> Optional[int]:
    """The last complete checkpoint's round (None when there is none)."""
    return self._manager.latest_step()

  def due(self, rnd: int, rounds: int) -> bool:
    """Whether round ``rnd`` (0-based) ends with a checkpoint: every ``every``-th and the last."""
    return (rnd + 1) % self.every == 0 or rnd == rounds - 1

  def save(self, rnd: int, state: PyTree, bank: PyTree, meta: Dict[str, Any]) -> None:
    """Write the checkpoint taken after round ``rnd`` and wait until it is on disk."""
    if self._manager.latest_step() == rnd:
      return
    self._manager.save(rnd, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), bank=ocp.args.StandardSave(bank),
        meta=ocp.args.JsonSave(meta)))
    self._manager.wait_until_finished()

  def _restore(self, step: Optional[int], **items) -> Dict[str, Any]:
    step = self.latest() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    return self._manager.restore(step, args=ocp.args.Composite(**items))

  def restore(self, abstract_state: PyTree, abstract_bank: PyTree,
              step: Optional[int] = None) -> Tuple[PyTree, PyTree, Dict[str, Any]]:
    """``(state, bank, meta)`` of checkpoint ``step`` (default: the latest)."""
    got = self._restore(step, state=ocp.args.StandardRestore(abstract_state),
                        bank=ocp.args.StandardRestore(abstract_bank), meta=ocp.args.JsonRestore())
    return got['state'], got['bank'], got['meta']

  def restore_state(self, abstract_state: PyTree, step: Optional[int] = None
                    ) -> Tuple[PyTree, Dict[str, Any]]:
    """``(state, meta)`` of checkpoint ``step`` without its bank (what a report needs)."""
    got = self._restore(step, state=ocp.args.StandardRestore(abstract_state),
                        meta=ocp.args.JsonRestore())
    return got['state'], got['meta']

  def meta(self, step: Optional[int] = None) -> Dict[str, Any]:
    """Only the JSON bookkeeping of checkpoint ``step`` (default: the latest)."""
    return self._restore(step, meta=ocp.args.JsonRestore())['meta']

  def close(self) -> None:
    self._manager.close()


def tree_bytes(tree: PyTree) -> int:
  """Bytes of the arrays in ``tree`` (abstract shapes are fine)."""
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def check_writable(workdir: str, need_bytes: int = 0) -> None:
  """Fail before training when ``workdir`` cannot hold the run's outputs.

  Creates the folder, writes and removes a probe file, and compares the free space
  with ``need_bytes`` (the checkpoints the run will keep). Raises ValueError naming
  the folder and the cause.
  """
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, '.write-probe')
    with open(probe, 'wb') as f:
      f.write(b'\0' * 4096)
      f.flush()
      os.fsync(f.fileno())
    os.remove(probe)
  except OSError as e:
    why = {errno.EROFS: 'the file system is read-only', errno.ENOSPC: 'the disk is full',
           errno.EACCES: 'permission denied', errno.EDQUOT: 'the disk quota is exceeded',
           errno.ENOTDIR: 'a part of the path is a file, not a folder',
           errno.EEXIST: 'a file of that name is in the way'}.get(e.errno, e.strerror)
    raise ValueError(f'cannot write to the workdir {workdir}: {why} ({e}); '
                     'pass --workdir=<a writable folder>') from None
  free = shutil.disk_usage(workdir).free
  if need_bytes and free < need_bytes:
    raise ValueError(f'the workdir {workdir} has {free / 2**20:.1f} MiB free, but the run needs '
                     f'about {need_bytes / 2**20:.1f} MiB for its checkpoints; free space, lower '
                     'config.checkpoint.keep, or pass --workdir=<a folder with room>')


def flatten(d: Dict[str, Any], prefix: str = '') -> Dict[str, Any]:
  """A nested dict as ``{'a.b.c': value}``."""
  out = {}
  for k, v in d.items():
    name = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(flatten(v, name + '.'))
    else:
      out[name] = v
  return out


def config_diff(saved: Dict[str, Any], now: Dict[str, Any],
                ignore: Iterable[str] = RESUME_IGNORES,
                defaults: Optional[Dict[str, Any]] = None) -> List[str]:
  """Fields where two config dicts (as JSON) differ: ``['rounds: 12 -> 20', ...]``.

  Fields named in ``ignore`` (or below them) are skipped. Values are compared after
  a JSON round trip, so tuples and lists are equal. With ``defaults`` (a config dict),
  a field the saved config lacks counts as its default there: a field added to the
  package after the run was written, left at its default, does not block a resume.
  """
  a = flatten(json.loads(json.dumps(saved)))
  if defaults is not None:
    a = {**flatten(json.loads(json.dumps(defaults))), **a}
  b = flatten(json.loads(json.dumps(now)))
  ignore = tuple(ignore)
  skipped = lambda k: any(k == i or k.startswith(i + '.') for i in ignore)
  return [f'{k}: {a.get(k, "<absent>")!r} in the workdir, {b.get(k, "<absent>")!r} now'
          for k in sorted(set(a) | set(b)) if not skipped(k) and a.get(k) != b.get(k)]


def fresh_subfolder(workdir: str) -> str:
  """The first free ``<workdir>/run-<n>`` (n = 2, 3, ...): a new run never deletes an old one."""
  n = 2
  while os.path.exists(os.path.join(workdir, f'run-{n}')):
    n += 1
  return os.path.join(workdir, f'run-{n}')
