"""Fed-Vessel (6 retinal-vessel clients), METHOD.md 5 defaults.

Without --config.data.root it runs the built-in phantom (small images, few rounds,
a narrower UNet: see config.phantom).
"""
from pflresfim_jax.config import base_config


def get_config():
  config = base_config()
  config.data.name = 'vessel'
  config.data.image_size = (256, 256)
  config.paper_lr = 1e-3
  config.lr_schedule = 'step'
  config.augment.rot90 = True
  return config
