"""Every default of METHOD.md in one place: ``base_config()``.

configs/vessel.py, prostate.py and gland.py start from it and set what differs per
data set. Fields marked 'interpretation' are our choices where the paper is silent.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

METHODS = ('local', 'fedavg', 'fedprox', 'fednova', 'feddyn', 'scaffold', 'fedawa',
           'fedlws', 'fedrdn', 'moon', 'fedbn', 'siobn', 'fedper', 'fedrep', 'lg_fedavg',
           'fedcac', 'ditto', 'fedrod', 'pn', 'pfl_resfim')


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = 'pfl_resfim'        # one of METHODS, a comma list, 'all', or your own module:Class
  c.seeds = '0'                  # comma list, e.g. '0,1,2' -> mean +- std
  c.rounds = config_dict.placeholder(int)  # None: paper_rounds on real data, phantom.rounds on the phantom
  c.paper_rounds = 200           # T
  c.local_epochs = 2             # E
  c.batch_size = 8
  c.lr = config_dict.placeholder(float)  # None: paper_lr on real data, phantom.lr on the phantom
  c.paper_lr = 1e-3
  c.lr_schedule = 'step'         # 'step': halve every T/4 rounds; 'constant'
  c.weight_decay = 5e-4          # L2 coupled into Adam (add_decayed_weights before adam)
  c.aggregate_weights = 'batches'  # server weights: 'batches' per epoch (reference) or 'examples'

  c.data = ml_collections.ConfigDict()
  c.data.name = 'vessel'
  c.data.root = config_dict.placeholder(str)   # None: the built-in phantom
  c.data.clients = ''            # 'NAME=/path,...' to point clients at their own folders
  c.data.image_size = (256, 256)  # (H, W)
  c.data.cache_dir = config_dict.placeholder(str)  # None: $XDG_CACHE_HOME/pflresfim_jax (~/.cache/...)
  c.data.split_seed = 0          # seeded train/val/test cuts

  c.phantom = ml_collections.ConfigDict()
  c.phantom.image_size = 64
  c.phantom.rounds = 16
  c.phantom.lr = 3e-3  # faster than the paper's 1e-3 so the short phantom run segments (see README)
  c.phantom.model_base = 8
  c.phantom.num_sites = 6
  c.phantom.seed = 0
  c.phantom.shift = 'mixed'  # what separates the sites: 'mixed' (style and labels), 'style' or 'label' only

  c.model = ml_collections.ConfigDict()
  c.model.name = 'unet'
  c.model.base = config_dict.placeholder(int)  # None: paper_base on real data, phantom.model_base on the phantom
  c.model.paper_base = 16
  c.model.levels = 5    # UNet2D resolution levels; 5 is the reference (fewer: smaller, faster to compile)
  c.model.bias_init = 'torch'   # conv biases: 'torch' (Conv2d default, the reference) or 'zeros'
  c.model.bn_unbiased = True    # BatchNorm tracks the unbiased batch variance, as torch does
  c.model.conv = 'auto'         # convolutions: 'xla', 'im2col', 'canonical'; 'auto': canonical on CPU, xla elsewhere

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
  c.fisher.chunk_size = config_dict.placeholder(int)  # examples per vmap(grad) or batched pass; None: 1 (vmap; 4 where loops are unrolled), 8 (layers)
  c.fisher.grads = 'vmap'        # speed only: per-example gradients by jax.vmap(jax.grad) or 'layers' (one batched backward pass per chunk, fisher_layers.py)
  c.fisher.conv = 'auto'         # speed only: the Fisher's convolutions; 'auto': the model's (model.conv)

  c.resfim = ml_collections.ConfigDict()
  c.resfim.ratio = 0.2           # interpretation: fraction kept local
  c.resfim.scope = 'tensor'      # interpretation: or 'global'
  c.resfim.residual = 'abs'      # interpretation: or 'relative'
  c.resfim.eps = 1e-8
  c.resfim.selector = 'residual'  # ablation: 'fisher', 'inverse', 'random', 'fedcac' (selectors.py)
  c.resfim.every = 1             # interpretation
  c.resfim.warmup_rounds = 0     # interpretation

  c.fedprox = ml_collections.ConfigDict({'mu': 1e-3})
  c.feddyn = ml_collections.ConfigDict({'mu': 0.01})   # FL-MedSegBench
  c.fedawa = ml_collections.ConfigDict({'lr': 1e-3})   # FL-MedSegBench: its server Adam's rate
  c.fedlws = ml_collections.ConfigDict({'beta': 0.03, 'min_tau': 0.01, 'max_tau': 0.05})   # FL-MedSegBench Fundus scripts
  c.moon = ml_collections.ConfigDict({'mu': 0.01, 'temperature': 0.5})   # FL-MedSegBench
  c.ditto = ml_collections.ConfigDict({'mu': 1e-3, 'lr': 1e-4})
  c.fedrep = ml_collections.ConfigDict({'head_epochs': 1})   # interpretation
  c.fedcac = ml_collections.ConfigDict({'tau': 0.5, 'beta': 100.0})

  c.engine = ml_collections.ConfigDict()
  c.engine.client_axis = 'auto'  # 'vmap' | 'map' | 'auto' (map)
  c.engine.unroll = 'auto'       # unroll training/Fisher loops: 'auto' (no), 'true', 'false'
  c.engine.precision = 'fp32'
  c.engine.devices = 'auto'      # devices the client axis is split over: 'auto' (all) or an int
  c.engine.cpu_devices = 2       # XLA devices the host CPU is split into (entry points, at start):
                                 # each runs its clients on its own thread; 1: one device
                                 # (README, Execution on CPU and accelerators)

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
  c.checkpoint.stop_grace = 20.0 # s a Ctrl-C/SIGTERM waits for the round in flight before
                                 # saving the last completed round and stopping (stopping.py)

  c.report = ml_collections.ConfigDict()
  c.report.enabled = True        # report.md / report.html in the workdir at the end
  c.report.examples = 1          # test images per client in the prediction grid
  c.report.colours = 64          # PNG palette size (adaptive, at most 256); 0: full colour
  c.tensorboard = 'auto'         # event files when tensorboardX / tensorboard is importable; 'true' / 'false'

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 16
  c.eval.threshold = 0.5
  # First round whose val improvements record test metrics (METHOD.md 7): 'half' = T//2
  # (its "second half"); 'after_half' = T//2 + 1, as FL-MedSegBench's main_seg.py
  # (`rounds > args.T//2`). See first_recorded_round.
  c.eval.record_from = 'half'
  return c


# ------------------------------------------------------------------ validation
# Every field's rule, checked before anything is loaded or traced (build.resolve), so
# a bad value is one line naming its full field, not a traceback minutes later.
def _number(lo=None, hi=None, *, integer=False, open_lo=False, open_hi=False, none=False):
  kind = 'an integer' if integer else 'a number'
  bounds = ''.join([f' {">" if open_lo else ">="} {lo}' if lo is not None else '',
                    ' and' if lo is not None and hi is not None else '',
                    f' {"<" if open_hi else "<="} {hi}' if hi is not None else ''])

  def check(v):
    if v is None and none:
      return None
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type:
      return f'must be {kind}{bounds}'
    if ((lo is not None and (v <= lo if open_lo else v < lo)) or
        (hi is not None and (v >= hi if open_hi else v > hi))):
      return f'must be {kind}{bounds}'
    return None
  return check


def _one_of(*options):
  def check(v):
    value = v.lower() if isinstance(v, str) else v
    return None if value in options else f'must be one of {options}'
  return check


def _image_size(v):
  """An int or (H, W) of positive multiples of 16: UNet2D pools four times."""
  sizes = (v, v) if isinstance(v, int) and not isinstance(v, bool) else tuple(v) if isinstance(
      v, (tuple, list)) else ()
  if len(sizes) != 2 or not all(isinstance(s, int) and s >= 16 and s % 16 == 0 for s in sizes):
    return 'must be a positive multiple of 16, or two of them (H, W): UNet2D pools four times'
  return None


def _devices(v):
  if v == 'auto' or (str(v).isdigit() and int(v) >= 1):
    return None
  return "must be 'auto' or a positive integer"


_INT1, _INT0 = _number(1, integer=True), _number(0, integer=True)
_FRACTION = _number(0.0, 1.0)
_FLAG = _one_of(True, False, 'true', 'false')

# eval.record_from -> rounds added to T//2 (see base_config).
RECORD_FROM = {'half': 0, 'after_half': 1}


RULES = {
    'rounds': _number(1, integer=True, none=True),   # None: filled by build.resolve
    'paper_rounds': _INT1, 'local_epochs': _INT0, 'batch_size': _INT1,
    'lr': _number(0.0, open_lo=True, none=True), 'paper_lr': _number(0.0, open_lo=True), 'lr_schedule': _one_of('step', 'constant'),
    'weight_decay': _number(0.0), 'aggregate_weights': _one_of('batches', 'examples'),
    'data.name': _one_of('vessel', 'prostate', 'gland'), 'data.image_size': _image_size,
    'phantom.image_size': _image_size, 'phantom.rounds': _INT1, 'phantom.lr': _number(0.0, open_lo=True), 'phantom.model_base': _INT1,
    'phantom.shift': _one_of('mixed', 'style', 'label'),   # phantom.SHIFTS
    'phantom.num_sites': _INT1,   # its upper end (the phantom's site count) is checked by phantom.load
    'model.name': _one_of('unet'), 'model.base': _number(1, integer=True, none=True),
    'model.paper_base': _INT1, 'model.levels': _number(2, 5, integer=True),
    'model.bias_init': _one_of('torch', 'zeros'), 'model.bn_unbiased': _FLAG,   # models.BIAS_INITS
    'model.conv': _one_of('auto', 'xla', 'im2col', 'canonical'),
    'augment.flip': _FLAG, 'augment.rot90': _FLAG,
    'spectral.ratio': _number(0.0, 0.5, open_hi=True), 'spectral.lam_min': _FRACTION,
    'spectral.lam_max': _FRACTION, 'spectral.share': _one_of('per_image', 'client_mean'),
    'fisher.loss': _one_of('nll', 'train'), 'fisher.num_examples': _INT1,
    'fisher.chunk_size': _number(1, integer=True, none=True),
    'fisher.conv': _one_of('auto', 'xla', 'im2col', 'canonical'),
    'fisher.grads': _one_of('vmap', 'layers'),   # resfim.GRADS
    'resfim.ratio': _FRACTION, 'resfim.scope': _one_of('tensor', 'global'),
    'resfim.residual': _one_of('abs', 'relative'), 'resfim.eps': _number(0.0, open_lo=True),
    'resfim.every': _INT1, 'resfim.warmup_rounds': _INT0,
    'resfim.selector': _one_of('residual', 'fisher', 'inverse', 'random', 'fedcac'),   # selectors.SELECTORS
    'fedprox.mu': _number(0.0), 'moon.mu': _number(0.0), 'feddyn.mu': _number(0.0, open_lo=True), 'fedawa.lr': _number(0.0, open_lo=True),
    'fedlws.beta': _number(0.0), 'fedlws.min_tau': _number(0.0), 'fedlws.max_tau': _number(0.0), 'moon.temperature': _number(0.0, open_lo=True), 'ditto.mu': _number(0.0), 'ditto.lr': _number(0.0, open_lo=True),
    'fedrep.head_epochs': _INT0, 'fedcac.tau': _FRACTION, 'fedcac.beta': _number(0.0, open_lo=True),
    'engine.client_axis': _one_of('vmap', 'map', 'auto'),
    'engine.unroll': _one_of('auto', True, False, 'true', 'false'),
    'engine.precision': _one_of('fp32', 'bf16'), 'engine.devices': _devices,
    'engine.cpu_devices': _INT1,
    'cluster.num_processes': _INT0, 'cluster.process_id': _number(-1, integer=True),
    'checkpoint.every': _INT1, 'checkpoint.keep': _INT1, 'checkpoint.stop_grace': _number(0.0),
    'report.examples': _INT0, 'report.colours': _number(0, 256, integer=True),
    'tensorboard': _one_of('auto', True, False, 'true', 'false'),
    'eval.batch_size': _INT1, 'eval.threshold': _number(0.0, 1.0, open_lo=True, open_hi=True),
    'eval.record_from': _one_of(*RECORD_FROM),
    'data.split_seed': _INT0, 'phantom.seed': _INT0, 'report.enabled': _FLAG, 'resume': _FLAG,
    'compile_cache': _FLAG, 'distributed': _FLAG,
}
# Free-form strings, checked where they are parsed: method and seeds (build.parse_*),
# paths (the loaders, which name the file), the cluster's address and device list.
PARSED_ELSEWHERE = ('method', 'seeds', 'data.root', 'data.clients', 'data.cache_dir',
                    'cluster.coordinator_address', 'cluster.local_device_ids')


def validate(config) -> None:
  """Raise ValueError naming the full field (``config.resfim.ratio``) of the first bad value.

  Fields a config does not have are skipped (a config from an older version).
  """
  def get(path):
    node = config
    for key in path.split('.'):
      if key not in node:
        return _MISSING
      node = node[key]
    return node

  for path, rule in RULES.items():
    value = get(path)
    problem = None if value is _MISSING else rule(value)
    if problem:
      raise ValueError(f'config.{path} {problem}, got {value!r}')
  lam_min, lam_max = get('spectral.lam_min'), get('spectral.lam_max')
  if _MISSING not in (lam_min, lam_max) and lam_min > lam_max:
    raise ValueError(f'config.spectral.lam_min ({lam_min}) must be <= config.spectral.lam_max ({lam_max})')
  if isinstance(get('rounds'), int):
    first_recorded_round(config)


def first_recorded_round(config) -> int:
  """The first round (0-based) whose val Dice improvements record a client's test
  metrics: ``T//2``, or ``T//2 + 1`` under ``eval.record_from='after_half'``.

  Raises:
    ValueError: that round is past the last one (``config.rounds`` too small).
  """
  record_from = config.eval.get('record_from', 'half')
  first = config.rounds // 2 + RECORD_FROM[record_from]
  if first > config.rounds - 1:
    raise ValueError(f'config.eval.record_from={record_from!r} records from round {first}, '
                     f'past the last of config.rounds={config.rounds}: use \'half\' or more rounds')
  return first


_MISSING = object()
