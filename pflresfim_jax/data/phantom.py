"""The built-in phantom federation: procedural retinal-vessel sites (DATA.md).

Six sites share the anatomy (branching, tortuous vessel trees that leave an
optic-disc-like origin and taper, inside a circular field of view) but differ the
way real hospitals do:

* style, mostly in low spatial frequencies: background and vessel tint, uneven
  illumination (a gradient and vignetting), contrast, plus blur and noise;
* label convention (different annotators): some sites mark thin capillaries,
  others only vessels above a width; some mark slightly dilated vessels;
* size: 12 to 40 images per site.

Everything is deterministic given ``seed``, at any resolution, generated in memory
in seconds with numpy. :func:`write_benchmark_layout` writes it to disk in the
Fed-Vessel benchmark layout so the real loaders can be exercised on it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import zipfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from pflresfim_jax.data import federation

log = logging.getLogger('pflresfim_jax')


@dataclasses.dataclass(frozen=True)
class SiteStyle:
  name: str
  num_images: int
  background: Tuple[float, float, float]  # fundus tint, RGB in [0, 1]
  vessel: Tuple[float, float, float]      # vessel tint
  contrast: float                          # vessel opacity
  gradient: Tuple[float, float]            # illumination slope along (y, x)
  vignette: float                          # darkening at the rim
  blur: float                              # Gaussian sigma, in units of 1/256 of the image
  noise: float                             # additive Gaussian sigma
  min_label_width: float                   # annotator ignores vessels thinner (px at 256)
  label_dilation: float                    # annotator draws vessels this much wider (px at 256)


SITES: Tuple[SiteStyle, ...] = (
    SiteStyle('PhantomA', 20, (0.78, 0.36, 0.16), (0.45, 0.08, 0.05), 0.75, (0.10, 0.05), 0.35, 1.0, 0.015, 0.0, 0.0),
    SiteStyle('PhantomB', 12, (0.55, 0.42, 0.30), (0.25, 0.15, 0.10), 0.55, (-0.25, 0.10), 0.55, 2.0, 0.030, 3.0, 0.0),
    SiteStyle('PhantomC', 28, (0.92, 0.55, 0.25), (0.60, 0.20, 0.08), 0.85, (0.0, 0.30), 0.20, 0.6, 0.010, 0.0, 1.5),
    SiteStyle('PhantomD', 16, (0.40, 0.25, 0.22), (0.12, 0.05, 0.06), 0.60, (0.20, -0.20), 0.65, 1.5, 0.040, 4.0, 1.0),
    SiteStyle('PhantomE', 40, (0.70, 0.62, 0.45), (0.35, 0.25, 0.20), 0.45, (0.05, -0.05), 0.25, 2.5, 0.020, 0.0, 0.0),
    SiteStyle('PhantomF', 24, (0.85, 0.30, 0.30), (0.50, 0.05, 0.10), 0.70, (-0.15, -0.25), 0.45, 1.0, 0.025, 2.0, 2.0),
)


# What separates the sites (``phantom.shift``): 'mixed' = style and label convention (the
# sites above); 'style' = acquisition only (every site annotates as PhantomA: every
# vessel, at its width); 'label' = label convention only (every site imaged as PhantomA).
SHIFTS = ('mixed', 'style', 'label')
_STYLE_FIELDS = ('background', 'vessel', 'contrast', 'gradient', 'vignette', 'blur', 'noise')
_LABEL_FIELDS = ('min_label_width', 'label_dilation')


def sites_for(shift: str = 'mixed', num_sites: int = len(SITES)) -> Tuple[SiteStyle, ...]:
  """The first ``num_sites`` sites, differing only in what ``shift`` names."""
  if shift not in SHIFTS:
    raise ValueError(f'phantom.shift must be one of {SHIFTS}, got {shift!r}')
  if not 1 <= num_sites <= len(SITES):
    raise ValueError(f'phantom.num_sites must be in [1, {len(SITES)}], got {num_sites}')
  ref = SITES[0]
  same = {'mixed': (), 'style': _LABEL_FIELDS, 'label': _STYLE_FIELDS}[shift]
  return tuple(dataclasses.replace(site, **{f: getattr(ref, f) for f in same})
               for site in SITES[:num_sites])


def _branch(rng, start, angle, width, steps, depth, size, segs):
  """Random-walk a tapering vessel; spawn thinner children along the way."""
  p = np.asarray(start, np.float64)
  step = 0.035 * size
  for i in range(steps):
    angle += rng.normal(0.0, 0.22)
    q = p + step * np.array([np.sin(angle), np.cos(angle)])
    w = width * (1.0 - 0.45 * i / steps)
    segs.append((p[0], p[1], q[0], q[1], w))
    p = q
    if depth > 0 and rng.uniform() < 0.22 and i > 1:
      side = rng.choice([-1.0, 1.0])
      _branch(rng, p, angle + side * rng.uniform(0.5, 1.0), w * rng.uniform(0.55, 0.75),
              max(4, int(steps * rng.uniform(0.4, 0.7))), depth - 1, size, segs)


def _vessel_tree(rng, size: int) -> np.ndarray:
  """Segments ``[S, 5]`` = (y0, x0, y1, x1, width) in pixels of a ``size`` image."""
  disc = np.array([size * 0.5 + rng.normal(0, 0.04 * size),
                   size * (0.5 + rng.choice([-1, 1]) * rng.uniform(0.15, 0.25))])
  toward_centre = np.arctan2(0.0, size * 0.5 - disc[1])
  segs: List[tuple] = []
  for direction in (-1.0, 1.0):
    for spread in (0.55, 1.25):
      angle = toward_centre + direction * spread + rng.normal(0, 0.12)
      _branch(rng, disc, angle, rng.uniform(6.0, 8.0) * size / 256, 22, 3, size, segs)
  return np.array(segs, np.float64), disc


def _rasterise(segs: np.ndarray, size: int, min_width: float, dilation: float):
  """Soft vessel opacity and the binary label of one annotator convention.

  Every segment paints the pixels of its bounding box (grown by its reach): all
  segments at once, each in a window of the largest box's size, cells outside its own
  box masked off; overlapping segments combine by maximum (opacity) and or (label).
  """
  y0, x0, y1, x1, w = segs.T
  r = w / 2 + dilation + 2
  lo_y = np.maximum(0, np.trunc(np.minimum(y0, y1) - r).astype(np.int64))
  hi_y = np.minimum(size, np.trunc(np.maximum(y0, y1) + r).astype(np.int64) + 1)
  lo_x = np.maximum(0, np.trunc(np.minimum(x0, x1) - r).astype(np.int64))
  hi_x = np.minimum(size, np.trunc(np.maximum(x0, x1) + r).astype(np.int64) + 1)
  span_y = int(np.max(hi_y - lo_y, initial=0))   # empty boxes (hi <= lo) count as 0
  span_x = int(np.max(hi_x - lo_x, initial=0))
  iy = lo_y[:, None, None] + np.arange(span_y)[None, :, None]   # [S, span_y, 1]
  ix = lo_x[:, None, None] + np.arange(span_x)[None, None, :]   # [S, 1, span_x]
  inside = (iy < hi_y[:, None, None]) & (ix < hi_x[:, None, None])
  col = lambda v: v[:, None, None]
  py, px = iy + 0.5, ix + 0.5
  dy, dx = col(y1 - y0), col(x1 - x0)
  t = np.clip(((py - col(y0)) * dy + (px - col(x0)) * dx) / np.maximum(dy * dy + dx * dx, 1e-9), 0, 1)
  d = np.hypot(py - (col(y0) + t * dy), px - (col(x0) + t * dx))
  value = np.clip(col(w / 2 + 0.5) - d, 0, 1) * col(np.minimum(1.0, w))
  yy, xx = np.broadcast_arrays(iy, ix)
  opacity = np.zeros((size, size))
  np.maximum.at(opacity, (yy[inside], xx[inside]), value[inside])
  label = np.zeros((size, size), bool)
  hit = inside & (d <= col(w / 2 + dilation)) & col(w >= min_width)
  label[yy[hit], xx[hit]] = True
  return opacity, label


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
  if sigma < 0.3:
    return img
  radius = int(3 * sigma) + 1
  k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  k /= k.sum()
  pad = np.pad(img, ((radius, radius), (radius, radius), (0, 0)), mode='edge')
  tmp = np.apply_along_axis(lambda v: np.convolve(v, k, mode='valid'), 0, pad)
  return np.apply_along_axis(lambda v: np.convolve(v, k, mode='valid'), 1, tmp)


def render(site: SiteStyle, rng: np.random.Generator, size: int) -> Tuple[np.ndarray, np.ndarray]:
  """One phantom image ``[size, size, 3]`` in [0, 1] and its label ``[size, size, 1]``."""
  scale = size / 256.0
  segs, disc = _vessel_tree(rng, size)
  opacity, label = _rasterise(segs, size, site.min_label_width * scale,
                              site.label_dilation * scale)
  yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size - 0.5
  fov = np.hypot(yy, xx) <= 0.46
  bg = np.asarray(site.background) * (1 + rng.normal(0, 0.04, 3))
  img = bg[None, None, :] * (1 - site.contrast * opacity[..., None]) \
      + np.asarray(site.vessel)[None, None, :] * site.contrast * opacity[..., None]
  dd = np.hypot((np.mgrid[0:size, 0:size][0] + 0.5 - disc[0]) / size,
                (np.mgrid[0:size, 0:size][1] + 0.5 - disc[1]) / size)
  img = img + 0.35 * np.exp(-(dd / 0.06) ** 2)[..., None]  # bright optic disc
  light = (1 + site.gradient[0] * yy * 2 + site.gradient[1] * xx * 2) \
      * (1 - site.vignette * (np.hypot(yy, xx) / 0.46) ** 2)
  img = img * light[..., None]
  img = _gaussian_blur(img, site.blur * scale)
  img = img + rng.normal(0, site.noise, img.shape)
  img = np.clip(img, 0, 1) * fov[..., None]
  return img.astype(np.float32), (label & fov)[..., None].astype(np.float32)


def generate(seed: int = 0, image_size: int = 64, sites: Sequence[SiteStyle] = SITES,
             images_per_site: Sequence[int] = ()) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
  """All images of every site: ``{name: (images [n,S,S,3], labels [n,S,S,1])}``.

  Args:
    seed: the only source of randomness.
    image_size: ``S`` (any positive size; 64 for quick CPU runs, 256 for the paper).
    sites: site styles.
    images_per_site: optional override of every site's image count.
  """
  out = {}
  for k, site in enumerate(sites):
    n = images_per_site[k] if images_per_site else site.num_images
    rng = np.random.default_rng([seed, k])
    pairs = [render(site, rng, image_size) for _ in range(n)]
    out[site.name] = (np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))
  return out


def _cache_key(seed: int, image_size: int, sites: Sequence[SiteStyle],
               images_per_site: Sequence[int]) -> str:
  """What :func:`generate`'s arrays depend on: its arguments, this file's code, numpy."""
  with open(__file__, 'rb') as f:
    source = hashlib.sha256(f.read()).hexdigest()
  what = [seed, image_size, [dataclasses.astuple(s) for s in sites], list(images_per_site),
          source, np.__version__]
  return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:24]


def _cached_generate(cache_dir: str, seed: int, image_size: int, sites: Sequence[SiteStyle],
                     images_per_site: Sequence[int]) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
  """:func:`generate`, kept in ``<cache_dir>/phantom-<key>.npz`` (the key: its arguments,
  this file's source and numpy's version). An unreadable file is drawn and written again;
  a folder that cannot be written is only warned about."""
  path = os.path.join(cache_dir, f'phantom-{_cache_key(seed, image_size, sites, images_per_site)}.npz')
  if os.path.exists(path):
    try:
      with np.load(path) as z:
        return {s.name: (z[f'{s.name}/x'], z[f'{s.name}/y']) for s in sites}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
      log.warning('phantom cache %s unreadable (%s): drawing the images again', path, e)
  data = generate(seed, image_size, sites, images_per_site)
  tmp = f'{path}.{os.getpid()}.tmp.npz'
  try:
    os.makedirs(cache_dir, exist_ok=True)
    np.savez(tmp, **{f'{n}/{a}': arr for n, (x, y) in data.items() for a, arr in (('x', x), ('y', y))})
    os.replace(tmp, path)
  except OSError as e:   # only a cache: the run goes on without it
    log.warning('phantom not cached in %s (%s)', cache_dir, e)
    if os.path.exists(tmp):
      os.remove(tmp)
  return data


def _test_split(n: int, test_fraction: float, seed: int):
  """(train+val indices, test indices) of one site: shared by load and the disk layout."""
  return federation.split_indices(n, [1 - test_fraction, test_fraction], seed)


def load(seed: int = 0, image_size: int = 64, test_fraction: float = 0.3,
         val_fraction: float = 0.2, num_sites: int = len(SITES),
         images_per_site: Sequence[int] = (), shift: str = 'mixed',
         cache_dir: Optional[str] = None) -> federation.Federation:
  """The phantom as a :class:`Federation`.

  Each site: ``test_fraction`` of its images is the test split, the rest is split
  ``1 - val_fraction`` / ``val_fraction`` into train / val (seeded shuffles), like the
  benchmark's Train/Test folders with the 80/20 train/val cut. ``shift``: see
  :func:`sites_for` (the anatomy drawn for a seed is the same under every shift).
  ``cache_dir``: keep the drawn images there (:func:`_cached_generate`; the same arrays,
  bit for bit, without drawing them again).
  """
  sites = sites_for(shift, num_sites)
  data = (generate(seed, image_size, sites, images_per_site) if cache_dir is None
          else _cached_generate(cache_dir, seed, image_size, sites, images_per_site))
  per_client = []
  for k, site in enumerate(sites):
    x, y = data[site.name]
    trainval, test = _test_split(len(x), test_fraction, seed + k)
    tr, va = federation.split_indices(len(trainval), [1 - val_fraction, val_fraction], seed + 100 + k)
    per_client.append({'train': (x[trainval[tr]], y[trainval[tr]]),
                       'val': (x[trainval[va]], y[trainval[va]]),
                       'test': (x[test], y[test])})
  return federation.from_client_splits('phantom', [s.name for s in sites], per_client)


def write_benchmark_layout(root: str, seed: int = 0, image_size: int = 64,
                           test_fraction: float = 0.3, num_sites: int = len(SITES),
                           images_per_site: Sequence[int] = (), shift: str = 'mixed') -> None:
  """Write the phantom as ``<root>/<site>/{Train,Test}/Original/{Images,Labels}/<name>.png``.

  Refuses to write into an existing site folder (nothing is overwritten).
  """
  from PIL import Image
  sites = sites_for(shift, num_sites)
  data = generate(seed, image_size, sites, images_per_site)
  for k, site in enumerate(sites):
    x, y = data[site.name]
    trainval, test = _test_split(len(x), test_fraction, seed + k)
    if os.path.exists(os.path.join(root, site.name)):
      raise FileExistsError(f'{os.path.join(root, site.name)} exists; choose an empty folder')
    for part, idx in (('Train', trainval), ('Test', test)):
      for sub in ('Images', 'Labels'):
        os.makedirs(os.path.join(root, site.name, part, 'Original', sub))
      for i in idx:
        stem = f'{site.name}_{i:03d}'
        Image.fromarray(np.round(x[i] * 255).astype(np.uint8)).save(
            os.path.join(root, site.name, part, 'Original', 'Images', stem + '.png'))
        Image.fromarray((y[i, :, :, 0] * 255).astype(np.uint8)).save(
            os.path.join(root, site.name, part, 'Original', 'Labels', stem + '.png'))
