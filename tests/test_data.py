import os

import numpy as np
import pytest
from PIL import Image

from pflresfim_jax.data import federation, phantom


def test_phantom_is_deterministic_and_sized():
  a = phantom.generate(seed=3, image_size=32, images_per_site=[2] * 6)
  b = phantom.generate(seed=3, image_size=32, images_per_site=[2] * 6)
  c = phantom.generate(seed=4, image_size=32, images_per_site=[2] * 6)
  for name in a:
    np.testing.assert_array_equal(a[name][0], b[name][0])
    assert a[name][0].shape == (2, 32, 32, 3) and a[name][1].shape == (2, 32, 32, 1)
    assert 0.0 <= a[name][0].min() and a[name][0].max() <= 1.0
    assert set(np.unique(a[name][1])) <= {0.0, 1.0}
  assert not np.array_equal(a['PhantomA'][0], c['PhantomA'][0])
  counts = [s.num_images for s in phantom.SITES]
  assert min(counts) == 12 and max(counts) == 40


def _rasterise_per_pixel(segs, size, min_width, dilation):
  """Every pixel against every segment: distance to the segment, soft opacity, label."""
  opacity = np.zeros((size, size))
  label = np.zeros((size, size), bool)
  for i in range(size):
    for j in range(size):
      py, px = i + 0.5, j + 0.5
      for y0, x0, y1, x1, w in segs:
        dy, dx = y1 - y0, x1 - x0
        t = np.clip(((py - y0) * dy + (px - x0) * dx) / max(dy * dy + dx * dx, 1e-9), 0, 1)
        d = np.hypot(py - (y0 + t * dy), px - (x0 + t * dx))
        opacity[i, j] = max(opacity[i, j], np.clip(w / 2 + 0.5 - d, 0, 1) * min(1.0, w))
        label[i, j] |= bool(w >= min_width and d <= w / 2 + dilation)
  return opacity, label


@pytest.mark.parametrize('min_width,dilation', [(0.0, 0.0), (1.2, 1.5)])
def test_rasterise_matches_every_pixel_against_every_segment(min_width, dilation):
  # Random segments, some crossing the border, one of length 0, thin and wide ones.
  rng = np.random.default_rng(0)
  start = rng.uniform(-3, 27, size=(12, 2))
  end = start + rng.normal(0, 3, size=(12, 2))
  end[0] = start[0]
  segs = np.column_stack([start, end, rng.uniform(0.2, 3.0, size=12)])
  got = phantom._rasterise(segs, 24, min_width, dilation)
  want = _rasterise_per_pixel(segs, 24, min_width, dilation)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
  assert want[1].any() and (want[0] > 0).any()


def test_sites_differ_in_low_frequency_style_and_label_convention():
  data = phantom.generate(seed=0, image_size=64, images_per_site=[4] * 6)
  means = np.stack([x.mean(axis=(0, 1, 2)) for x, _ in data.values()])   # colour per site
  gaps = np.abs(means[:, None] - means[None]).sum(-1)[~np.eye(6, dtype=bool)]
  assert gaps.min() > 0.05
  # Same anatomy generator, different annotators: B ignores thin vessels, C dilates.
  fg = {k: y.mean() for k, (_, y) in data.items()}
  assert fg['PhantomC'] > fg['PhantomA'] > fg['PhantomB']


def test_shift_separates_style_from_label_convention():
  """'style': every site annotates as PhantomA, images as in 'mixed'; 'label': every site
  imaged as PhantomA, labels as in 'mixed' (one anatomy per site and seed throughout)."""
  gen = lambda shift: phantom.generate(seed=1, image_size=32, sites=phantom.sites_for(shift),
                                       images_per_site=[3] * 6)
  mixed, style, label = gen('mixed'), gen('style'), gen('label')
  conventions = {(s.min_label_width, s.label_dilation) for s in phantom.sites_for('style')}
  assert conventions == {(phantom.SITES[0].min_label_width, phantom.SITES[0].label_dilation)}
  assert len({(s.background, s.blur, s.noise) for s in phantom.sites_for('label')}) == 1
  assert phantom.sites_for('mixed') == phantom.SITES
  for site in phantom.SITES:
    name = site.name
    np.testing.assert_array_equal(style[name][0], mixed[name][0])     # same images
    np.testing.assert_array_equal(label[name][1], mixed[name][1])     # same labels
    same_rule = (site.min_label_width, site.label_dilation) in conventions
    assert np.array_equal(style[name][1], mixed[name][1]) == same_rule, name
    assert np.array_equal(label[name][0], mixed[name][0]) == (name == 'PhantomA'), name
  colour = lambda data: np.stack([x.mean(axis=(0, 1, 2)) for x, _ in data.values()])
  spread = lambda data: np.ptp(colour(data), axis=0).sum()
  assert spread(label) < 0.2 * spread(style)
  with pytest.raises(ValueError, match='phantom.shift'):
    phantom.sites_for('both')
  fed = phantom.load(seed=1, image_size=16, num_sites=2, images_per_site=[6, 6], shift='style')
  assert list(fed.clients) == ['PhantomA', 'PhantomB'] and fed.train.counts.sum() > 0


def test_split_indices():
  parts = federation.split_indices(10, [0.7, 0.3], seed=0)
  assert [len(p) for p in parts] == [7, 3]
  assert sorted(np.concatenate(parts).tolist()) == list(range(10))
  again = federation.split_indices(10, [0.7, 0.3], seed=0)
  assert all(np.array_equal(p, q) for p, q in zip(parts, again))


def test_load_splits_are_disjoint_and_padded():
  fed = phantom.load(seed=0, image_size=16, num_sites=2, images_per_site=[10, 6])
  assert fed.clients == ('PhantomA', 'PhantomB')
  for k, n in enumerate([10, 6]):
    assert sum(int(getattr(fed, s).counts[k]) for s in federation.SPLITS) == n
  assert fed.train.images.shape[1] == int(fed.train.counts.max())
  assert 'PhantomB: train' in fed.summary()
  with pytest.raises(ValueError, match='num_sites'):
    phantom.load(num_sites=9)


def test_load_with_a_cache_dir_keeps_the_drawn_images(tmp_path, monkeypatch, caplog):
  kwargs = dict(seed=2, image_size=16, num_sites=2, images_per_site=[5, 4], shift='style')
  plain = phantom.load(**kwargs)
  first = phantom.load(**kwargs, cache_dir=str(tmp_path))
  files = sorted(os.listdir(tmp_path))
  assert len(files) == 1 and files[0].startswith('phantom-') and files[0].endswith('.npz')

  def no_drawing(*a, **k):
    raise AssertionError('drawn again despite the cache')
  monkeypatch.setattr(phantom, 'generate', no_drawing)
  second = phantom.load(**kwargs, cache_dir=str(tmp_path))
  for fed in (first, second):
    for s in federation.SPLITS:
      for a in ('images', 'labels', 'counts'):
        np.testing.assert_array_equal(getattr(getattr(fed, s), a), getattr(getattr(plain, s), a))
        assert getattr(getattr(fed, s), a).dtype == getattr(getattr(plain, s), a).dtype
  monkeypatch.undo()
  # Other settings are another file; an unreadable file is drawn and written again.
  phantom.load(**{**kwargs, 'seed': 3}, cache_dir=str(tmp_path))
  assert len(os.listdir(tmp_path)) == 2
  with open(tmp_path / files[0], 'wb') as f:
    f.write(b'not an npz')
  with caplog.at_level('WARNING', logger='pflresfim_jax'):
    again = phantom.load(**kwargs, cache_dir=str(tmp_path))
  assert 'unreadable' in caplog.text and files[0] in caplog.text
  np.testing.assert_array_equal(again.train.images, plain.train.images)
  with np.load(tmp_path / files[0]) as z:
    assert len(z.files) == 4
  assert not [f for f in os.listdir(tmp_path) if 'tmp' in f]
  blocked = tmp_path / 'a-file'   # a cache folder that cannot be made: warned, not fatal
  blocked.write_text('in the way')
  with caplog.at_level('WARNING', logger='pflresfim_jax'):
    fed = phantom.load(**kwargs, cache_dir=str(blocked / 'cache'))
  assert 'phantom not cached' in caplog.text
  np.testing.assert_array_equal(fed.test.labels, plain.test.labels)


def test_empty_split_is_an_error_naming_the_client():
  x = np.zeros((3, 4, 4, 3), np.float32)
  y = np.zeros((3, 4, 4, 1), np.float32)
  with pytest.raises(ValueError, match="'B'.*val"):
    federation.from_client_splits('t', ['A', 'B'], [
        {'train': (x, y), 'val': (x, y), 'test': (x, y)},
        {'train': (x, y), 'val': (x[:0], y[:0]), 'test': (x, y)}])


def test_write_benchmark_layout(tmp_path):
  phantom.write_benchmark_layout(str(tmp_path), seed=0, image_size=32, num_sites=2,
                                 images_per_site=[4, 3])
  img_dir = tmp_path / 'PhantomA' / 'Train' / 'Original' / 'Images'
  lab_dir = tmp_path / 'PhantomA' / 'Train' / 'Original' / 'Labels'
  names = sorted(os.listdir(img_dir))
  assert names and names == sorted(os.listdir(lab_dir))
  assert len(os.listdir(tmp_path / 'PhantomB' / 'Test' / 'Original' / 'Images')) >= 1
  data = phantom.generate(seed=0, image_size=32, sites=phantom.SITES[:2], images_per_site=[4, 3])
  i = int(names[0].split('_')[1].split('.')[0])
  img = np.asarray(Image.open(img_dir / names[0])) / 255.0
  np.testing.assert_allclose(img, data['PhantomA'][0][i], atol=1 / 255)   # 8-bit PNG quantisation
  lab = np.asarray(Image.open(lab_dir / names[0])) > 127
  np.testing.assert_array_equal(lab, data['PhantomA'][1][i, :, :, 0] > 0.5)
  with pytest.raises(FileExistsError):
    phantom.write_benchmark_layout(str(tmp_path), image_size=32, num_sites=1, images_per_site=[2])
