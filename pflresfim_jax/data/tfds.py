"""TensorFlow Datasets builders for the three federations (optional extra: ``.[tfds]``).

Each builder reads the folder the user downloaded by hand (TFDS's ``manual_dir``)
with the package's own loaders, so the examples are exactly the arrays
``experiments/main.py`` trains on (same preprocessing, same seeded splits)::

    import pflresfim_jax.data.tfds  # registers fed_vessel, fed_prostate, fed_gland
    import tensorflow_datasets as tfds
    ds = tfds.load('fed_vessel', split='train', data_dir='~/tensorflow_datasets',
                   download_and_prepare_kwargs={'download_config': tfds.download.DownloadConfig(
                       manual_dir='/content/drive/MyDrive/Fed-Vessel')})
    drive = ds.filter(lambda ex: ex['client'] == 'DRIVE')

Splits: 'train', 'validation', 'test'. Features: 'image' float32 ``[H, W, C]`` in
[0, 1], 'label' uint8 ``[H, W, 1]`` (0/1), 'client' (the client's name), 'index'
(position in the client's split). Nothing is downloaded and the manual folder is
only read.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import tensorflow_datasets as tfds

from pflresfim_jax.config import base_config
from pflresfim_jax.data import federation, loaders

_INSTRUCTIONS = {
    'vessel': 'Put Fed-Vessel in the benchmark layout in manual_dir: '
              '<client>/{Train,Test}/Original/{Images,Labels}/<name>.<ext> (see README, Real data).',
    'prostate': 'Put the multi-site prostate MRI in manual_dir: <site>/CaseXX.nii.gz and '
                'CaseXX_segmentation.nii.gz (see README, Real data).',
    'gland': 'Put Fed-Gland in manual_dir: <client>/.../Original/<img> and '
             '.../Meibomian_Gland_Labels/<img> (see README, Real data).',
}
SPLITS = {'train': 'train', 'validation': 'val', 'test': 'test'}


class _Federation(tfds.core.GeneratorBasedBuilder):
  """Common builder: subclasses set DATA_NAME, IMAGE_SIZE and CHANNELS.

  CACHE_DIR: the loaders' decoded-array cache (None: ~/.cache/pflresfim_jax).
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Splits and preprocessing of pflresfim_jax.data.loaders.'}
  DATA_NAME = ''
  IMAGE_SIZE: Tuple[int, int] = (256, 256)
  CHANNELS = 3
  CACHE_DIR: Optional[str] = None

  def _info(self) -> tfds.core.DatasetInfo:
    h, w = self.IMAGE_SIZE
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'Fed-{self.DATA_NAME.capitalize()} as read by pflresfim_jax.data.loaders.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(h, w, self.CHANNELS), dtype=np.float32,
                                          encoding=tfds.features.Encoding.ZLIB),
            'label': tfds.features.Tensor(shape=(h, w, 1), dtype=np.uint8,
                                          encoding=tfds.features.Encoding.ZLIB),
            'client': tfds.features.Text(),
            'index': np.int32,
        }),
        supervised_keys=('image', 'label'),
    )

  def loader_config(self, manual_dir: str):
    """The run config whose data section the loaders read (defaults of base_config)."""
    c = base_config()
    c.data.name = self.DATA_NAME
    c.data.root = str(manual_dir)
    c.data.image_size = tuple(self.IMAGE_SIZE)
    c.data.cache_dir = self.CACHE_DIR
    return c

  def _split_generators(self, dl_manager):
    fed = loaders.load(self.loader_config(dl_manager.manual_dir))
    return {name: self._generate_examples(fed, split) for name, split in SPLITS.items()}

  def _generate_examples(self, fed: federation.Federation, split: str):
    s = getattr(fed, split)
    for k, client in enumerate(fed.clients):
      for i in range(int(s.counts[k])):
        yield f'{client}/{i}', {'image': s.images[k, i].astype(np.float32),
                                'label': (s.labels[k, i] > 0.5).astype(np.uint8),
                                'client': client, 'index': i}


class FedVessel(_Federation):
  """Fed-Vessel (retinal fundus vessels): 256x256 RGB."""
  DATA_NAME = 'vessel'
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS['vessel']


class FedProstate(_Federation):
  """Fed-Prostate (T2 MRI): 256x256, the slice repeated to 3 channels."""
  DATA_NAME = 'prostate'
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS['prostate']


class FedGland(_Federation):
  """Fed-Gland (meibography): 192x384 RGB."""
  DATA_NAME = 'gland'
  IMAGE_SIZE = (192, 384)
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS['gland']
