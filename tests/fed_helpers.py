"""A tiny federation and context for engine and method tests."""
import jax
import numpy as np

from pflresfim_jax import build, config as config_lib, methods
from pflresfim_jax.data import phantom


def tiny_config(**overrides):
  c = config_lib.base_config()
  c.rounds = 2
  c.lr = 1e-3
  c.local_epochs = 1
  c.batch_size = 4
  c.model.base = 2
  c.model.levels = 2       # the smallest UNet: its programs compile fastest
  c.phantom.image_size = 16
  c.phantom.num_sites = 3
  c.fisher.num_examples = 4
  c.fisher.chunk_size = 2
  c.spectral.ratio = 0.1
  c.eval.batch_size = 4
  # Compact loops (also what 'auto' gives): programs compile faster than unrolled ones,
  # and compilation is most of the suite's time.
  c.engine.unroll = 'false'
  # XLA's convolution: for these tiny UNets it compiled in about 60% of the time of
  # im2col; tests/test_models.py checks 'canonical' (the CPU default, 'auto') and im2col
  # against it, and test_train.py's end-to-end run uses the default.
  c.model.conv = 'xla'
  for k, v in overrides.items():
    node = c
    *path, last = k.split('.')
    for p in path:
      node = node[p]
    node[last] = v
  return build.resolve(c)


_FED = {}


def tiny_fed(image_size=16, num_sites=3):
  key = (image_size, num_sites)
  if key not in _FED:
    _FED[key] = phantom.load(seed=0, image_size=image_size, num_sites=num_sites,
                             images_per_site=[7, 5, 9][:num_sites])
  return _FED[key]


def setup(method, **overrides):
  cfg = tiny_config(**overrides)
  fed = tiny_fed(cfg.phantom.image_size, cfg.phantom.num_sites)
  ctx = methods.Context(build.model(cfg), fed.num_clients, fed.image_shape, cfg, cfg.rounds)
  algo = methods.build(method, ctx)
  data, bank = build.device_data(fed), build.spectral_bank(fed, cfg)
  return cfg, fed, algo, data, bank


def start(method, **overrides):
  """setup() plus the initial state, the batch-count weights the round uses (jnp [K])
  and their normalised float64 copy (the reference's agg_weights)."""
  cfg, fed, algo, data, bank = setup(method, **overrides)
  state = jax.jit(algo.init)(jax.random.PRNGKey(0))
  counts = np.asarray(data['train']['count'])
  weights = jax.numpy.asarray(np.ceil(counts / cfg.batch_size), jax.numpy.float32)
  p = np.asarray(weights, np.float64) / float(np.sum(weights))
  return cfg, fed, algo, data, bank, state, weights, p


def leaves_equal_across_clients(tree):
  # Leaves the clients trained apart differ by far more than float noise (1e-5 relative).
  return [bool(np.allclose(x, x[:1], rtol=1e-5, atol=1e-6)) for x in jax.tree.leaves(tree)]
