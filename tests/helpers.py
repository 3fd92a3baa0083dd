"""Small shared fixtures for the tests (tiny models and data)."""
import jax
import jax.numpy as jnp
import numpy as np

from pflresfim_jax import models


def tiny_unet(size=16, base=2, seed=0):
  model = models.UNet2D(base=base)
  params, stats = models.init(model, jax.random.PRNGKey(seed), (size, size, 3))
  return model, params, stats


def random_batch(n, size=16, seed=0):
  rng = np.random.default_rng(seed)
  image = rng.uniform(size=(n, size, size, 3)).astype(np.float32)
  label = (rng.uniform(size=(n, size, size, 1)) > 0.7).astype(np.float32)
  return {'image': jnp.asarray(image), 'label': jnp.asarray(label)}
