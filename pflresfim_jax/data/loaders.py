"""Real federations from the folders users downloaded by hand (DATA.md).

* Fed-Vessel: the benchmark layout ``<root>/<client>/{Train,Test}/Original/{Images,Labels}``,
  or per-client official layouts (DRIVE, CHASE_DB1, HRF, DR HAGIS, LES-AV) given with
  ``data.clients='NAME=/path,...'``.
* Fed-Prostate: ``<root>/<site>/CaseXX.nii.gz`` + ``CaseXX_segmentation.nii.gz``
  (``_Segmentation`` too; site aliases ISBI = RUNMC, ISBI_1.5 = BMC).
* Fed-Gland: ``<root>/<client>/.../Original`` + ``Meibomian_Gland_Labels`` (MGD-1K, CAMG).

Images are matched to labels by file stem (case-insensitive, any image extension).
Nothing is ever written into the data folder: decoded arrays are cached under
``data.cache_dir`` (default ``~/.cache/pflresfim_jax``), keyed by the files' paths,
sizes and mtimes and the preprocessing settings. Every problem raises
:class:`DataError` naming the file or client and what to do.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from pflresfim_jax.data import federation

log = logging.getLogger('pflresfim_jax')

IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.gif', '.bmp', '.ppm')
PROSTATE_ALIASES = {'isbi': 'RUNMC', 'isbi_1.5': 'BMC'}

Pair = Tuple[str, str]  # (image path, label path)


class DataError(ValueError):
  """A data folder that cannot be read as the configured federation."""


# ----------------------------------------------------------------------------- files

def _child(folder: str, name: str, required: bool = True) -> Optional[str]:
  """``folder/name`` matched case-insensitively."""
  if os.path.isdir(folder):
    for entry in sorted(os.listdir(folder)):
      if entry.lower() == name.lower():
        return os.path.join(folder, entry)
  if required:
    raise DataError(f'{os.path.join(folder, name)}: folder not found (names are matched '
                    f'case-insensitively); check the layout described in the README')
  return None


def _images_in(folder: str) -> Dict[str, str]:
  """{lower-case stem: path} of the image files in ``folder``."""
  out = {}
  for entry in sorted(os.listdir(folder)):
    stem, ext = os.path.splitext(entry)
    if ext.lower() in IMAGE_EXTS and os.path.isfile(os.path.join(folder, entry)):
      if stem.lower() in out:
        raise DataError(f'{os.path.join(folder, entry)}: two files share the stem {stem!r}')
      out[stem.lower()] = os.path.join(folder, entry)
  return out


def match_by_stem(image_dir: str, label_dir: str, label_stem=lambda s: s) -> List[Pair]:
  """Pairs of image and label files; ``label_stem`` maps an image stem to its label's."""
  images, labels = _images_in(image_dir), _images_in(label_dir)
  if not images:
    raise DataError(f'{image_dir}: no images ({", ".join(IMAGE_EXTS)})')
  pairs, used = [], set()
  for stem, path in images.items():
    want = label_stem(stem).lower()
    if want not in labels:
      raise DataError(f'{path}: no label named {want}.* in {label_dir}')
    pairs.append((path, labels[want]))
    used.add(want)
  extra = sorted(set(labels) - used)
  if extra:
    raise DataError(f'{labels[extra[0]]}: a label without an image in {image_dir}')
  return pairs


def _read_rgb(path: str) -> np.ndarray:
  from PIL import Image
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert('RGB'))
  except Exception as e:  # PIL raises many kinds for broken files
    raise DataError(f'{path}: unreadable or truncated image ({e})') from None


def read_label(path: str) -> np.ndarray:
  """Binary mask ``[H, W]`` bool. JPEG labels: grey > 100 (compression noise); others:
  grey > 127, or > 0 for 0/1-coded files."""
  from PIL import Image
  try:
    with Image.open(path) as im:
      grey = np.asarray(im.convert('L'))
  except Exception as e:
    raise DataError(f'{path}: unreadable or truncated label ({e})') from None
  if os.path.splitext(path)[1].lower() in ('.jpg', '.jpeg'):
    return grey > 100
  if grey.max() <= 1:
    return grey > 0
  grey_frac = np.mean((grey > 5) & (grey < 250))
  if grey_frac > 0.05:
    raise DataError(f'{path}: label is not binary ({100 * grey_frac:.0f}% of pixels are '
                    f'grey); labels must be black/white masks')
  return grey > 127


def _resize(arr: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
  """Nearest-neighbour resize of ``[H, W, ...]`` uint8/bool."""
  from PIL import Image
  if arr.shape[:2] == tuple(hw):
    return arr
  if arr.dtype == bool:
    return np.asarray(Image.fromarray(arr.astype(np.uint8) * 255).resize(hw[::-1], Image.NEAREST)) > 127
  return np.asarray(Image.fromarray(arr).resize(hw[::-1], Image.NEAREST))


def load_pairs(pairs: Sequence[Pair], hw: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
  """Decode, check and resize pairs: images [N,H,W,3] float32 in [0,1], labels [N,H,W,1]."""
  xs, ys = [], []
  for img_path, lab_path in pairs:
    img, lab = _read_rgb(img_path), read_label(lab_path)
    if img.shape[:2] != lab.shape:
      raise DataError(f'{lab_path}: label is {lab.shape[1]}x{lab.shape[0]} but its image '
                      f'{img_path} is {img.shape[1]}x{img.shape[0]}')
    xs.append(_resize(img, hw).astype(np.float32) / 255.0)
    ys.append(_resize(lab, hw)[..., None].astype(np.float32))
  return np.stack(xs), np.stack(ys)


# ----------------------------------------------------------------------------- vessel

def _num(stem: str) -> str:
  m = re.match(r'\D*(\d+)', stem)
  return m.group(1).lstrip('0') if m else stem


def vessel_layout(folder: str) -> Tuple[List[Pair], List[Pair], Optional[str]]:
  """Recognise one vessel client's folder: ``(train pairs, test pairs, note)``.

  Benchmark and DRIVE layouts carry their own train/test split; CHASE_DB1 uses
  the common 20/8 split, HRF 5 per category for training (15/30); DR HAGIS and LES-AV
  return everything as train with ``test = []`` (split later, seeded).
  """
  if not os.path.isdir(folder):
    raise DataError(f'{folder}: client folder not found')
  train_dir = _child(folder, 'Train', required=False)
  if train_dir and _child(train_dir, 'Original', required=False):
    parts = []
    for part in ('Train', 'Test'):
      orig = _child(_child(folder, part), 'Original')
      parts.append(match_by_stem(_child(orig, 'Images'), _child(orig, 'Labels')))
    return parts[0], parts[1], 'benchmark'
  training = _child(folder, 'training', required=False)
  if training and _child(training, '1st_manual', required=False):  # DRIVE
    parts = []
    for part in ('training', 'test'):
      base = _child(folder, part)
      labels = {_num(s): s for s in _images_in(_child(base, '1st_manual'))}
      parts.append(match_by_stem(_child(base, 'images'), _child(base, '1st_manual'),
                                 lambda s, labels=labels: labels.get(_num(s), s + '_manual1')))
    return parts[0], parts[1], 'DRIVE'
  if _child(folder, 'Fundus_Images', required=False):  # DR HAGIS
    return match_by_stem(_child(folder, 'Fundus_Images'), _child(folder, 'Manual_Segmentations'),
                         lambda s: s + '_manual_orig'), [], 'DR HAGIS'
  if _child(folder, 'vessel-segmentations', required=False):  # LES-AV
    return match_by_stem(_child(folder, 'images'), _child(folder, 'vessel-segmentations')), [], 'LES-AV'
  if _child(folder, 'manual1', required=False):  # HRF
    pairs = match_by_stem(_child(folder, 'images'), _child(folder, 'manual1'))
    train, test, seen = [], [], {}
    for pair in pairs:
      cat = os.path.splitext(os.path.basename(pair[0]))[0].split('_')[-1].lower()
      seen[cat] = seen.get(cat, 0) + 1
      (train if seen[cat] <= 5 else test).append(pair)
    return train, test, 'HRF'
  stems = _images_in(folder)
  if any(s.endswith('_1stho') for s in stems):  # CHASE_DB1, flat
    images = {s: p for s, p in stems.items() if not re.search(r'_(1st|2nd)ho$', s)}
    pairs = []
    for s, p in images.items():
      if s + '_1stho' not in stems:
        raise DataError(f'{p}: no label {s}_1stHO.* beside it')
      pairs.append((p, stems[s + '_1stho']))
    return pairs[:20], pairs[20:], 'CHASE_DB1'
  raise DataError(f'{folder}: not a known vessel layout (benchmark Train/Test/Original, DRIVE, '
                  f'CHASE_DB1, HRF, DR HAGIS, LES-AV)')


def _client_folders(config) -> List[Tuple[str, str]]:
  """[(client name, folder)] from data.clients or the sub-folders of data.root."""
  if config.data.clients:
    out = []
    for item in str(config.data.clients).split(','):
      if '=' not in item:
        raise DataError(f"data.clients: {item!r} is not NAME=/path")
      name, path = item.split('=', 1)
      out.append((name.strip(), os.path.expanduser(path.strip())))
    return out
  root = os.path.expanduser(config.data.root)
  if not os.path.isdir(root):
    raise DataError(f'data.root: folder {root} not found')
  subs = [(e, os.path.join(root, e)) for e in sorted(os.listdir(root))
          if os.path.isdir(os.path.join(root, e)) and not e.startswith('.')]
  if not subs:
    raise DataError(f'data.root: {root} holds no client folders')
  return subs


def _split_trainval(train, test, val_fraction, test_fraction, seed):
  """Seeded train/val (and test, where the layout has none) cut of pairs."""
  if not test:
    train_idx, test_idx = federation.split_indices(len(train), [1 - test_fraction, test_fraction], seed)
    train, test = [train[i] for i in train_idx], [train[i] for i in test_idx]
  tr, va = federation.split_indices(len(train), [1 - val_fraction, val_fraction], seed + 1)
  return {'train': [train[i] for i in tr], 'val': [train[i] for i in va], 'test': test}


def _split_70_10_20(items: Sequence, seed: int) -> Dict[str, list]:
  """Seeded train/val/test cut 70/10/20 (gland images; prostate patients, never split)."""
  parts = federation.split_indices(len(items), [0.7, 0.1, 0.2], seed)
  return {s: [items[i] for i in p] for s, p in zip(federation.SPLITS, parts)}


def _empty(hw) -> Tuple[np.ndarray, np.ndarray]:
  return np.zeros((0, *hw, 3), np.float32), np.zeros((0, *hw, 1), np.float32)


def vessel(config) -> Tuple[List[str], List[Dict[str, List[Pair]]]]:
  names, splits = [], []
  for k, (name, folder) in enumerate(_client_folders(config)):
    train, test, layout = vessel_layout(folder)
    log.info('vessel client %s: %s layout, %d train+val, %d test', name, layout, len(train), len(test))
    names.append(name)
    splits.append(_split_trainval(train, test, 0.2, 0.3, config.data.split_seed + k))
  return names, splits


# ----------------------------------------------------------------------------- gland

def _gland_pairs(folder: str) -> List[Pair]:
  for dirpath, dirnames, _ in os.walk(folder):
    orig = next((d for d in dirnames if d.lower() == 'original'), None)
    labels = next((d for d in dirnames if d.lower() == 'meibomian_gland_labels'), None)
    if orig and labels:
      label_stems = _images_in(os.path.join(dirpath, labels))
      by_num = {_num(s): s for s in label_stems}

      def to_label(stem):
        if stem in label_stems:
          return stem
        return by_num.get(_num(stem), stem)   # CAMG: Image12 -> Seg12
      return match_by_stem(os.path.join(dirpath, orig), os.path.join(dirpath, labels), to_label)
  raise DataError(f'{folder}: no Original/ + Meibomian_Gland_Labels/ folders inside')


def gland(config):
  names, splits = [], []
  for k, (name, folder) in enumerate(_client_folders(config)):
    names.append(name)
    splits.append(_split_70_10_20(_gland_pairs(folder), config.data.split_seed + k))
  return names, splits


# ----------------------------------------------------------------------------- prostate

def prostate_cases(folder: str) -> List[Tuple[str, str]]:
  """[(volume, segmentation)] of one site folder (``CaseXX`` + ``_segmentation``)."""
  files = {f.lower(): f for f in os.listdir(folder) if f.lower().endswith(('.nii', '.nii.gz'))}
  cases = []
  for low, f in sorted(files.items()):
    if 'segmentation' in low:
      continue
    stem = low.split('.nii')[0]
    ext = low[len(stem):]
    seg = files.get(f'{stem}_segmentation{ext}')
    if seg is None:
      raise DataError(f'{os.path.join(folder, f)}: no {stem}_segmentation{ext} beside it')
    cases.append((os.path.join(folder, f), os.path.join(folder, seg)))
  segs = [f for low, f in files.items() if 'segmentation' in low]
  for s in segs:
    if not any(os.path.basename(c[1]) == s for c in cases):
      raise DataError(f'{os.path.join(folder, s)}: a segmentation without its volume')
  if not cases:
    raise DataError(f'{folder}: no CaseXX.nii.gz volumes')
  return cases


def prostate_slices(vol_path: str, seg_path: str, hw, adjacent: bool):
  """Preprocessed foreground slices of one case: images [n,H,W,3], labels [n,H,W,1]."""
  import nibabel as nib
  try:
    vol = np.asarray(nib.load(vol_path).get_fdata(), np.float32)
    seg = np.asarray(nib.load(seg_path).get_fdata()) > 0
  except Exception as e:
    raise DataError(f'{vol_path}: unreadable NIfTI ({e})') from None
  if vol.shape != seg.shape:
    raise DataError(f'{seg_path}: shape {seg.shape} differs from its volume {vol.shape}')
  vol = np.clip(vol, None, np.percentile(vol, 99))
  vol = (vol - vol.min()) / max(float(vol.max() - vol.min()), 1e-8)
  h, w = hw

  def crop(a):
    ph, pw = max(0, h - a.shape[0]), max(0, w - a.shape[1])
    a = np.pad(a, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    y0, x0 = (a.shape[0] - h) // 2, (a.shape[1] - w) // 2
    return a[y0:y0 + h, x0:x0 + w]
  vol, seg = crop(vol), crop(seg)
  depth = vol.shape[2]
  keep = [z for z in range(1, depth - 1) if seg[:, :, z].any()]
  xs = [np.stack([vol[:, :, z - 1], vol[:, :, z], vol[:, :, z + 1]], -1) if adjacent
        else np.repeat(vol[:, :, z:z + 1], 3, -1) for z in keep]
  ys = [seg[:, :, z:z + 1].astype(np.float32) for z in keep]
  shape = (0, h, w)
  return (np.stack(xs) if xs else np.zeros(shape + (3,), np.float32),
          np.stack(ys) if ys else np.zeros(shape + (1,), np.float32))


# ----------------------------------------------------------------------------- cache + entry

def _cache_key(config, files: Sequence[str]) -> str:
  stat = [(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in sorted(set(files))]
  prep = {'name': config.data.name, 'image_size': list(_hw(config)), 'seed': config.data.split_seed,
          'adjacent': bool(config.data.get('adjacent_slices', False)), 'version': 1}
  return hashlib.sha256(json.dumps([stat, prep]).encode()).hexdigest()[:24]


def _hw(config) -> Tuple[int, int]:
  size = config.data.image_size
  return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def cache_root(config) -> str:
  """``data.cache_dir``, or ``$XDG_CACHE_HOME/pflresfim_jax`` (``~/.cache/pflresfim_jax``):
  decoded data, the drawn phantom and compiled programs."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return config.data.get('cache_dir') or os.path.join(base, 'pflresfim_jax')


def _cache_dir(config) -> str:
  d = cache_root(config)
  root = config.data.root and os.path.realpath(os.path.expanduser(config.data.root))
  if root and os.path.realpath(d).startswith(root + os.sep):
    raise DataError(f'data.cache_dir {d} is inside data.root; the data folder is never written')
  return d


def load(config) -> federation.Federation:
  """The federation named by ``config.data.name`` from ``data.root`` / ``data.clients``."""
  name, hw = config.data.name, _hw(config)
  if name == 'vessel':
    clients, splits = vessel(config)
  elif name == 'gland':
    clients, splits = gland(config)
  elif name == 'prostate':
    clients, splits = [], []
    for k, (site, folder) in enumerate(_client_folders(config)):
      clients.append(PROSTATE_ALIASES.get(site.lower(), site))
      splits.append(_split_70_10_20(prostate_cases(folder), config.data.split_seed + k))
  else:
    raise DataError(f"data.name must be 'vessel', 'prostate' or 'gland', got {name!r}")
  files = [f for sp in splits for pairs in sp.values() for pair in pairs for f in pair]
  cache = os.path.join(_cache_dir(config), f'{name}-{_cache_key(config, files)}.npz')
  if os.path.exists(cache):
    log.info('data cache hit: %s', cache)
    with np.load(cache) as z:
      per_client = [{s: (z[f'{k}/{s}/x'], z[f'{k}/{s}/y']) for s in federation.SPLITS}
                    for k in range(len(clients))]
  else:
    per_client = []
    for sp in splits:
      if name == 'prostate':
        adjacent = bool(config.data.get('adjacent_slices', False))
        item = {}
        for s, cases in sp.items():
          parts = [prostate_slices(v, g, hw, adjacent) for v, g in cases]
          item[s] = (np.concatenate([p[0] for p in parts]),
                     np.concatenate([p[1] for p in parts])) if parts else _empty(hw)
        per_client.append(item)
      else:
        per_client.append({s: load_pairs(pairs, hw) if pairs else _empty(hw)
                           for s, pairs in sp.items()})
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    tmp = cache + '.tmp.npz'
    np.savez(tmp, **{f'{k}/{s}/{a}': arr for k, pc in enumerate(per_client)
                     for s, (x, y) in pc.items() for a, arr in (('x', x), ('y', y))})
    os.replace(tmp, cache)
  try:
    return federation.from_client_splits(name, clients, per_client)
  except ValueError as e:
    raise DataError(str(e)) from None
