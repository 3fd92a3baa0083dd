"""A federation in memory: K clients, each with train / val / test splits.

Clients hold different numbers of images; a split is stored stacked and padded,
``images [K, Nmax, H, W, C]``, ``labels [K, Nmax, H, W, 1]``, with ``counts [K]``.
Padded slots are never read as examples: every consumer masks them with
``index < counts[k]``.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence, Tuple

import numpy as np

SPLITS = ('train', 'val', 'test')


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of every client, stacked and padded.

  Attributes:
    images: float32 ``[K, Nmax, H, W, C]`` in [0, 1].
    labels: float32 ``[K, Nmax, H, W, 1]`` in {0, 1}.
    counts: int32 ``[K]``: real examples per client (the rest is padding).
  """
  images: np.ndarray
  labels: np.ndarray
  counts: np.ndarray

  def client(self, k: int) -> Tuple[np.ndarray, np.ndarray]:
    n = int(self.counts[k])
    return self.images[k, :n], self.labels[k, :n]


@dataclasses.dataclass(frozen=True)
class Federation:
  """Named clients and their splits."""
  name: str
  clients: Tuple[str, ...]
  train: Split
  val: Split
  test: Split

  @property
  def num_clients(self) -> int:
    return len(self.clients)

  @property
  def image_shape(self) -> Tuple[int, int, int]:
    return tuple(self.train.images.shape[2:])

  def summary(self) -> str:
    h, w, c = self.image_shape
    lines = [f'{self.name}: {self.num_clients} clients, images {h}x{w}x{c}']
    for k, name in enumerate(self.clients):
      counts = ', '.join(f'{s} {int(getattr(self, s).counts[k])}' for s in SPLITS)
      lines.append(f'  {name}: {counts}')
    return '\n'.join(lines)


def stack_clients(arrays: Sequence[Tuple[np.ndarray, np.ndarray]]) -> Split:
  """Pad per-client ``(images [n_k,H,W,C], labels [n_k,H,W,1])`` into a :class:`Split`."""
  counts = np.array([len(x) for x, _ in arrays], np.int32)
  nmax = max(1, int(counts.max()) if len(counts) else 1)
  shapes = {x.shape[1:] for x, _ in arrays if len(x)}
  if len(shapes) > 1:
    raise ValueError(f'clients have different image shapes: {sorted(shapes)}')
  shape = shapes.pop()
  images = np.zeros((len(arrays), nmax, *shape), np.float32)
  labels = np.zeros((len(arrays), nmax, *shape[:2], 1), np.float32)
  for k, (x, y) in enumerate(arrays):
    images[k, :len(x)] = x
    labels[k, :len(y)] = y.reshape(len(y), *shape[:2], 1)
  return Split(images, labels, counts)


def split_indices(n: int, fractions: Sequence[float], seed: int) -> List[np.ndarray]:
  """Seeded shuffle of ``range(n)`` cut into consecutive parts by ``fractions``.

  The last part takes the remainder; every part but an empty request gets at least
  one item when ``n`` allows.
  """
  order = np.random.default_rng(seed).permutation(n)
  sizes = [int(round(f * n)) for f in fractions[:-1]]
  sizes = [max(1, s) if f > 0 and n >= len(fractions) else s for s, f in zip(sizes, fractions)]
  cuts = np.cumsum(sizes)
  return [np.sort(p) for p in np.split(order, cuts)]


def from_client_splits(name: str, clients: Sequence[str],
                       per_client: Sequence[Dict[str, Tuple[np.ndarray, np.ndarray]]]) -> Federation:
  """Build a Federation from ``[{split: (images, labels)}]`` per client."""
  for cname, splits in zip(clients, per_client):
    for s in SPLITS:
      if len(splits[s][0]) == 0:
        raise ValueError(f'client {cname!r} has an empty {s} split; it needs more images')
  stacked = {s: stack_clients([pc[s] for pc in per_client]) for s in SPLITS}
  return Federation(name, tuple(clients), **stacked)
