"""Every default of METHOD.md in one place: ``base_config()``.

configs/vessel.py, prostate.py and gland.py start from it and set what differs per
data set. Fields marked 'interpretation' are our choices where the paper is silent.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

METHODS = ('local', 'fedavg', 'fedprox', 'fedbn', 'siobn', 'fedper', 'fedrep', 'lg_fedavg',
           'fedcac', 'ditto', 'fedrod', 'pfl_resfim')


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = 'pfl_resfim'        # one of METHODS, a comma list, or 'all'
  c.seeds = '0'                  # comma list, e.g. '0,1,2' -> mean +- std
  c.rounds = config_dict.placeholder(int)  # None: paper_rounds on real data, phantom.rounds on the phantom
  c.paper_rounds = 200           # T
  c.local_epochs = 2             # E
  c.batch_size = 8
  c.lr = 1e-3
  c.lr_schedule = 'step'         # 'step': halve every T/4 rounds; 'constant'
  c.weight_decay = 5e-4          # L2 coupled into Adam (add_decayed_weights before adam)

  c.data = ml_collections.ConfigDict()
  c.data.name = 'vessel'
  c.data.root = config_dict.placeholder(str)   # None: the built-in phantom
  c.data.clients = ''            # 'NAME=/path,...' to point clients at their own folders
  c.data.image_size = (256, 256)  # (H, W)
  c.data.cache_dir = config_dict.placeholder(str)  # None: ~/.cache/pflresfim_jax
  c.data.split_seed = 0          # seeded train/val/test cuts

  c.phantom = ml_collections.ConfigDict()
  c.phantom.image_size = 64
  c.phantom.rounds = 12
  c.phantom.model_base = 8
  c.phantom.num_sites = 6
  c.phantom.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.name = 'unet'
  c.model.base = config_dict.placeholder(int)  # None: paper_base on real data, phantom.model_base on the phantom
  c.model.paper_base = 16

  c.augment = ml_collections.ConfigDict()
  c.augment.flip = True
  c.augment.rot90 = True

  c.spectral = ml_collections.ConfigDict()
  c.spectral.ratio = 0.01        # L
  c.spectral.lam_min = 0.0
  c.spectral.lam_max = 1.0
  c.spectral.share = 'per_image'  # interpretation: or 'client_mean'

  c.fisher = ml_collections.ConfigDict()
  c.fisher.loss = 'nll'          # interpretation: 'nll' (pixel BCE) or 'train' (Dice+BCE)
  c.fisher.num_examples = 32     # interpretation
  c.fisher.chunk_size = config_dict.placeholder(int)  # examples per vmap(grad); None: 1, or 4 where loops are unrolled (CPU)

  c.resfim = ml_collections.ConfigDict()
  c.resfim.ratio = 0.2           # interpretation: fraction kept local
  c.resfim.scope = 'tensor'      # interpretation: or 'global'
  c.resfim.residual = 'abs'      # interpretation: or 'relative'
  c.resfim.eps = 1e-8
  c.resfim.every = 1             # interpretation
  c.resfim.warmup_rounds = 0     # interpretation

  c.fedprox = ml_collections.ConfigDict({'mu': 1e-3})
  c.ditto = ml_collections.ConfigDict({'mu': 1e-3, 'lr': 1e-4})
  c.fedrep = ml_collections.ConfigDict({'head_epochs': 1})   # interpretation
  c.fedcac = ml_collections.ConfigDict({'tau': 0.5, 'beta': 100.0})

  c.engine = ml_collections.ConfigDict()
  c.engine.client_axis = 'auto'  # 'vmap' | 'map' | 'auto' (map on GPU/TPU, vmap on CPU)
  c.engine.unroll = 'auto'       # unroll training/Fisher loops: 'auto' (CPU only), 'true', 'false'
  c.engine.precision = 'fp32'
  c.engine.devices = 'auto'      # devices the client axis is split over: 'auto' (all) or an int

  # Many processes, one simulation (pflresfim_jax/distributed.py): every process runs
  # the same command; empty / -1 cluster fields are auto-detected (TPU pods, Slurm, MPI).
  c.distributed = False
  c.cluster = ml_collections.ConfigDict()
  c.cluster.coordinator_address = ''   # 'host:port' of process 0
  c.cluster.num_processes = 0          # 0: auto-detect
  c.cluster.process_id = -1            # -1: auto-detect
  c.cluster.local_device_ids = ''      # e.g. '0,1': this process's devices; '': all

  c.compile_cache = True         # keep compiled programs in <data.cache_dir>/xla: a second run skips compiling
  c.resume = True                # re-running into a workdir resumes it; False: a fresh run in <workdir>/run-<n>
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 10        # rounds between checkpoints (the last round always gets one)
  c.checkpoint.keep = 3          # checkpoints kept per method and seed

  c.report = ml_collections.ConfigDict()
  c.report.enabled = True        # report.md / report.html in the workdir at the end
  c.report.examples = 1          # test images per client in the prediction grid
  c.tensorboard = 'auto'         # event files when tensorboardX / tensorboard is importable; 'true' / 'false'

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 16
  c.eval.threshold = 0.5
  return c
