"""The optional TFDS builders: run only where tensorflow_datasets (and TensorFlow) import."""
import numpy as np
import pytest

tfds = pytest.importorskip('tensorflow_datasets')
pytest.importorskip('tensorflow')

from pflresfim_jax.data import loaders, phantom, tfds as builders  # noqa: E402
from test_loaders import tree_hash  # noqa: E402


class TinyVessel(builders.FedVessel):
  """Fed-Vessel at 32x32, so the test stays small."""
  IMAGE_SIZE = (32, 32)


def test_builder_reads_manual_dir_into_the_loaders_arrays(tmp_path):
  root = tmp_path / 'manual'
  phantom.write_benchmark_layout(str(root), image_size=32, num_sites=2, images_per_site=[9, 7])
  before = tree_hash(root)
  TinyVessel.CACHE_DIR = str(tmp_path / 'cache')
  builder = TinyVessel(data_dir=str(tmp_path / 'tfds'))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
  assert tree_hash(root) == before                      # the manual folder is only read
  fed = loaders.load(builder.loader_config(str(root)))
  for tfds_split, split in builders.SPLITS.items():
    examples = list(tfds.as_numpy(builder.as_dataset(split=tfds_split)))
    s = getattr(fed, split)
    assert len(examples) == int(s.counts.sum())
    for ex in examples:
      k = fed.clients.index(ex['client'].decode())
      np.testing.assert_array_equal(ex['image'], s.images[k, ex['index']])
      np.testing.assert_array_equal(ex['label'], s.labels[k, ex['index']].astype(np.uint8))
  assert builder.info.features['image'].shape == (32, 32, 3)


def test_builder_names_and_sizes():
  assert builders.FedVessel.name == 'fed_vessel' and builders.FedGland.name == 'fed_gland'
  assert builders.FedGland.IMAGE_SIZE == (192, 384) and builders.FedProstate.name == 'fed_prostate'
  assert 'manual_dir' in builders.FedProstate.MANUAL_DOWNLOAD_INSTRUCTIONS
