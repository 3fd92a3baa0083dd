"""Fed-Gland (meibography, 2 clients), METHOD.md 5 defaults: 192x384, flips only."""
from pflresfim_jax.config import base_config


def get_config():
  config = base_config()
  config.data.name = 'gland'
  config.data.image_size = (192, 384)
  config.paper_lr = 1e-3
  config.lr_schedule = 'step'
  config.augment.rot90 = False
  return config
