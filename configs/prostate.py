"""Fed-Prostate (6 T2 MRI sites), METHOD.md 5 defaults: lr 1e-4, constant."""
from pflresfim_jax.config import base_config


def get_config():
  config = base_config()
  config.data.name = 'prostate'
  config.data.image_size = (256, 256)
  config.data.adjacent_slices = False   # True: 3 neighbouring slices as channels
  config.paper_lr = 1e-4
  config.lr_schedule = 'constant'
  config.augment.rot90 = True
  return config
