"""The evidence grid of experiments/evidence.py (pflresfim_jax/evidence.py).

The phantom at a size and length that finishes on a 2-core CPU in about a quarter of an
hour (13 min, 2026-12-05): 32x32 images, a 3-level UNet, 20 rounds at lr 3e-3 (at 1e-3 a
local model reached 28% val Dice by round 17 of this budget, at 3e-3 44%), a spectral
window of 3x3 (at 32x32, spectral.ratio 0.05 gives b = 1; the default 0.01 would
exchange only the 1x1 mean colour), two seeds.
"""
from pflresfim_jax.config import base_config


def get_config():
  config = base_config()
  config.data.name = 'vessel'
  config.data.image_size = (256, 256)
  config.augment.rot90 = True
  config.phantom.image_size = 32
  config.model.levels = 3
  config.rounds = 20
  config.lr = 3e-3
  config.spectral.ratio = 0.05
  config.seeds = '0,1'
  config.report.enabled = False   # evidence.md draws its own pictures
  return config
