"""Loaders on tiny fake trees written in the real on-disk layouts."""
import hashlib
import os

import numpy as np
import pytest
from PIL import Image

from pflresfim_jax import config as config_lib
from pflresfim_jax.data import loaders, phantom


def cfg(name, root=None, clients='', size=32, cache=None):
  c = config_lib.base_config()
  c.data.name = name
  c.data.root = root
  c.data.clients = clients
  c.data.image_size = (size, size) if isinstance(size, int) else size
  c.data.cache_dir = cache
  if name == 'prostate':
    c.data.adjacent_slices = False
  return c


def save_img(path, h=40, w=48, seed=0, ext=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(path)


def save_lab(path, h=40, w=48, seed=0):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed + 1000)
  lab = (rng.uniform(size=(h, w)) > 0.7).astype(np.uint8) * 255
  Image.fromarray(lab).convert('RGB' if path.lower().endswith(('.jpg', '.jpeg')) else 'L').save(path)


def tree_hash(root):
  h = hashlib.sha256()
  for dirpath, _, files in sorted(os.walk(root)):
    for f in sorted(files):
      p = os.path.join(dirpath, f)
      h.update(p.encode())
      h.update(open(p, 'rb').read())
  return h.hexdigest()


def benchmark_client(root, name, n_train=5, n_test=2, label_dir='Labels', ext='.png', lab_ext='.png'):
  for part, n in (('Train', n_train), ('Test', n_test)):
    for i in range(n):
      save_img(os.path.join(root, name, part, 'Original', 'Images', f'im{i}{ext}'), seed=i)
      save_lab(os.path.join(root, name, part, 'Original', label_dir, f'IM{i}{lab_ext}'), seed=i)


def test_vessel_benchmark_layout_and_no_writes(tmp_path):
  root = tmp_path / 'data'
  benchmark_client(str(root), 'ChaseDB', label_dir='labels', lab_ext='.jpg', ext='.JPG')
  benchmark_client(str(root), 'DRIVE', n_train=6, lab_ext='.gif')
  before = tree_hash(root)
  fed = loaders.load(cfg('vessel', str(root), cache=str(tmp_path / 'cache')))
  assert fed.clients == ('ChaseDB', 'DRIVE')
  assert int(fed.test.counts[0]) == 2 and int(fed.train.counts[1] + fed.val.counts[1]) == 6
  assert fed.train.images.shape[2:] == (32, 32, 3)
  assert set(np.unique(fed.train.labels)) <= {0.0, 1.0}
  assert tree_hash(root) == before


def test_phantom_round_trip_through_the_loader(tmp_path):
  root = tmp_path / 'ph'
  phantom.write_benchmark_layout(str(root), seed=0, image_size=32, num_sites=2, images_per_site=[6, 5])
  fed = loaders.load(cfg('vessel', str(root), cache=str(tmp_path / 'cache')))
  data = phantom.generate(seed=0, image_size=32, sites=phantom.SITES[:2], images_per_site=[6, 5])
  x, y = fed.test.client(0)
  # every loaded test image is one of the generated images, with its label
  for img, lab in zip(x, y):
    err = np.abs(data['PhantomA'][0] - img).max(axis=(1, 2, 3))
    i = int(err.argmin())
    assert err[i] <= 1 / 255 + 1e-6
    np.testing.assert_array_equal(lab, data['PhantomA'][1][i])


def test_official_vessel_layouts(tmp_path):
  d = tmp_path / 'DRIVE'
  for part, ids in (('training', (21, 22, 23, 24)), ('test', (1, 2))):
    for i in ids:
      save_img(str(d / part / 'images' / f'{i:02d}_{part}.tif'), seed=i)
      save_lab(str(d / part / '1st_manual' / f'{i:02d}_manual1.gif'), seed=i)
  c = tmp_path / 'CHASE'
  for i in range(1, 4):
    for eye in 'LR':
      save_img(str(c / f'Image_{i:02d}{eye}.jpg'), seed=i)
      save_lab(str(c / f'Image_{i:02d}{eye}_1stHO.png'), seed=i)
      save_lab(str(c / f'Image_{i:02d}{eye}_2ndHO.png'), seed=i + 1)
  h = tmp_path / 'HRF'
  for cat, ext in (('dr', '.JPG'), ('g', '.jpg'), ('h', '.jpg')):
    for i in range(1, 7):
      save_img(str(h / 'images' / f'{i:02d}_{cat}{ext}'), seed=i)
      save_lab(str(h / 'manual1' / f'{i:02d}_{cat}.tif'), seed=i)
  g = tmp_path / 'HAGIS'
  for i in (1, 2, 5, 9, 10):
    save_img(str(g / 'Fundus_Images' / f'{i}.jpg'), h=30 + i, seed=i)
    save_lab(str(g / 'Manual_Segmentations' / f'{i}_manual_orig.png'), h=30 + i, seed=i)
  l = tmp_path / 'LESAV'
  for i in range(5):
    save_img(str(l / 'images' / f'{i}.png'), seed=i)
    save_lab(str(l / 'vessel-segmentations' / f'{i}.png'), seed=i)
  clients = ','.join(f'{n}={tmp_path / n}' for n in ('DRIVE', 'CHASE', 'HRF', 'HAGIS', 'LESAV'))
  fed = loaders.load(cfg('vessel', clients=clients, cache=str(tmp_path / 'cache')))
  assert fed.clients == ('DRIVE', 'CHASE', 'HRF', 'HAGIS', 'LESAV')
  assert int(fed.test.counts[0]) == 2 and int(fed.test.counts[2]) == 3
  total = lambda k: sum(int(getattr(fed, s).counts[k]) for s in ('train', 'val', 'test'))
  assert [total(k) for k in range(5)] == [6, 6, 18, 5, 5]


def test_gland_layouts(tmp_path):
  m = tmp_path / 'MGD1k' / 'Subset'
  for i in range(10):
    save_img(str(m / 'Original' / f'{i}.{"JPG" if i % 2 else "jpg"}'), seed=i)
    save_lab(str(m / 'Meibomian_Gland_Labels' / f'{i}.{"tif" if i == 3 else "png"}'), seed=i)
  camg = tmp_path / 'CAMG'
  for i in range(10):
    save_img(str(camg / 'Original' / f'Image{i}.png'), seed=i)
    save_lab(str(camg / 'Meibomian_Gland_Labels' / f'Seg{i}.png'), seed=i)
  fed = loaders.load(cfg('gland', str(tmp_path), size=(16, 32), cache=str(tmp_path.parent / 'gcache')))
  assert fed.clients == ('CAMG', 'MGD1k') and fed.image_shape == (16, 32, 3)
  assert [int(fed.train.counts[k] + fed.val.counts[k] + fed.test.counts[k]) for k in range(2)] == [10, 10]


def nifti_site(folder, ids, seg_name='segmentation', depth=6):
  import nibabel as nib
  os.makedirs(folder, exist_ok=True)
  for i in ids:
    rng = np.random.default_rng(i)
    vol = rng.uniform(0, 500, (40, 40, depth)).astype(np.float32)
    seg = np.zeros((40, 40, depth), np.uint8)
    seg[15:25, 15:25, 2:4] = 2                       # label value 2: binarised
    nib.save(nib.Nifti1Image(vol, np.eye(4)), os.path.join(folder, f'Case{i:02d}.nii.gz'))
    nib.save(nib.Nifti1Image(seg, np.eye(4)), os.path.join(folder, f'Case{i:02d}_{seg_name}.nii.gz'))


def test_prostate(tmp_path):
  root = tmp_path / 'prostate'
  nifti_site(str(root / 'ISBI'), [0, 3, 7, 12, 13, 20, 21, 30, 31, 40])
  nifti_site(str(root / 'ISBI_1.5'), [1, 2, 4, 8, 9, 10, 11, 14, 15, 16], seg_name='Segmentation')
  fed = loaders.load(cfg('prostate', str(root), size=32, cache=str(tmp_path / 'cache')))
  assert fed.clients == ('RUNMC', 'BMC')
  # 2 foreground slices per case; patients 7/1/2 per split: never split a patient
  assert [int(fed.train.counts[0]), int(fed.val.counts[0]), int(fed.test.counts[0])] == [14, 2, 4]
  assert fed.train.images.max() <= 1.0 and set(np.unique(fed.train.labels)) == {0.0, 1.0}
  np.testing.assert_array_equal(fed.train.images[0, 0, :, :, 0], fed.train.images[0, 0, :, :, 2])


def test_cache_hit_and_invalidation(tmp_path, monkeypatch):
  root = tmp_path / 'data'
  benchmark_client(str(root), 'A')
  c = cfg('vessel', str(root), cache=str(tmp_path / 'cache'))
  first = loaders.load(c)
  calls = []
  original = loaders.load_pairs
  monkeypatch.setattr(loaders, 'load_pairs', lambda *a: calls.append(1) or original(*a))
  second = loaders.load(c)
  assert not calls
  np.testing.assert_array_equal(first.train.images, second.train.images)
  path = root / 'A' / 'Train' / 'Original' / 'Images' / 'im0.png'
  os.utime(path, ns=(1, 1))
  loaders.load(c)
  assert calls


@pytest.mark.parametrize('breakage,match', [
    ('missing_label', r'im1\.png: no label'),
    ('orphan_label', r'IM9\.png: a label without an image'),
    ('size_mismatch', r'IM0\.png: label is 48x40 but its image'),
    ('truncated', r'im0\.png: unreadable or truncated'),
    ('grey_label', r'IM0\.png: label is not binary'),
    ('empty_client', r'Images: no images'),
    ('missing_folder', r'Test.*folder not found'),
])
def test_bad_input_errors_name_the_file(tmp_path, breakage, match):
  root = tmp_path / 'data'
  benchmark_client(str(root), 'A')
  train = root / 'A' / 'Train' / 'Original'
  if breakage == 'missing_label':
    os.remove(train / 'Labels' / 'IM1.png')
  elif breakage == 'orphan_label':
    save_lab(str(train / 'Labels' / 'IM9.png'))
  elif breakage == 'size_mismatch':
    save_img(str(train / 'Images' / 'im0.png'), h=20, w=20)
  elif breakage == 'truncated':
    data = open(train / 'Images' / 'im0.png', 'rb').read()
    open(train / 'Images' / 'im0.png', 'wb').write(data[:len(data) // 3])
  elif breakage == 'grey_label':
    Image.fromarray(np.full((40, 48), 128, np.uint8)).save(train / 'Labels' / 'IM0.png')
  elif breakage == 'empty_client':
    for f in os.listdir(train / 'Images'):
      os.remove(train / 'Images' / f)
  elif breakage == 'missing_folder':
    import shutil
    shutil.rmtree(root / 'A' / 'Test')
  before = tree_hash(root)
  with pytest.raises(loaders.DataError, match=match):
    loaders.load(cfg('vessel', str(root), cache=str(tmp_path / 'cache')))
  assert tree_hash(root) == before


def test_missing_root_and_empty_split(tmp_path):
  with pytest.raises(loaders.DataError, match='data.root'):
    loaders.load(cfg('vessel', str(tmp_path / 'nope')))
  root = tmp_path / 'data'
  benchmark_client(str(root), 'A', n_train=1)
  with pytest.raises(loaders.DataError, match="'A'.*empty"):
    loaders.load(cfg('vessel', str(root), cache=str(tmp_path / 'cache')))
  with pytest.raises(loaders.DataError, match='inside data.root'):
    loaders.load(cfg('vessel', str(root), cache=str(root / 'cache')))


def _config_file(name):
  import importlib.util
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(name, os.path.join(root, 'configs', f'{name}.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


@pytest.mark.parametrize('name', ['vessel', 'gland', 'prostate'])
def test_configs_train_on_a_data_root(tmp_path, name):
  """configs/<name>.py with --config.data.root runs the real-data path end to end."""
  from pflresfim_jax import train
  root = tmp_path / 'data'
  if name == 'vessel':
    phantom.write_benchmark_layout(str(root), seed=0, image_size=32, num_sites=2, images_per_site=[8, 7])
    size, clients = (32, 32), ['PhantomA', 'PhantomB']
  elif name == 'prostate':
    nifti_site(str(root / 'ISBI'), range(10))
    nifti_site(str(root / 'UCL'), range(10, 20))
    size, clients = (32, 32), ['RUNMC', 'UCL']
  else:
    for client in ('MGD1k', 'CAMG'):
      for i in range(8):
        save_img(str(root / client / 'Original' / f'{i}.jpg'), seed=i)
        save_lab(str(root / client / 'Meibomian_Gland_Labels' / f'{i}.png'), seed=i)
    size, clients = (16, 32), ['CAMG', 'MGD1k']     # non-square, as the real 192x384
  before = tree_hash(root)
  c = _config_file(name)
  c.data.root, c.data.image_size, c.data.cache_dir = str(root), size, str(tmp_path / 'cache')
  c.method, c.rounds, c.local_epochs, c.model.base = 'local', 1, 1, 2
  c.eval.batch_size, c.report.enabled, c.model.conv, c.model.levels = 4, False, 'xla', 2
  out = train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert out['clients'] == clients
  assert (tmp_path / 'run' / 'results.csv').read_text().splitlines()[0] == ','.join(['method', *clients, 'mean'])
  assert tree_hash(root) == before


def test_cache_root_is_the_config_field_else_the_xdg_cache_folder(monkeypatch, tmp_path):
  assert loaders.cache_root(cfg('vessel', cache=str(tmp_path / 'c'))) == str(tmp_path / 'c')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert loaders.cache_root(cfg('vessel')) == str(tmp_path / 'xdg' / 'pflresfim_jax')
  monkeypatch.delenv('XDG_CACHE_HOME')
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  assert loaders.cache_root(cfg('vessel')) == str(tmp_path / 'home' / '.cache' / 'pflresfim_jax')
