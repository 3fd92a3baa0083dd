"""The PyTorch anchor of the benchmark (``benchmark.py --anchor=torch``): the same UNet
in PyTorch, trained the way the authors' benchmark trains (FL-MedSegBench: one model
and one Adam per client, a Python loop over the clients), and torch.func's
per-example gradients, so our figures and theirs come from one run on the same cores.

torch is optional (``pip install -e '.[anchor]'``); importing this module without it
raises ImportError, which the benchmark reports as a skipped anchor. On a machine where
torch sees a CUDA GPU the anchor runs there (``cudnn.benchmark`` on, as PERFORMANCE.md's
PyTorch figures were taken; timings synchronise the GPU), else on the CPU threads the
benchmark sets.

The network mirrors ``pflresfim_jax.models.UNet2D`` layer for layer (NCHW instead of
NHWC): :func:`load_flax` copies our parameters into it, and tests/test_benchmark.py
checks that both give the same logits.
"""
import time

import numpy as np
import torch
from torch import nn


class ConvBN(nn.Sequential):
  """conv (bias) -> BatchNorm2d -> optional ReLU, as models.ConvBN."""

  def __init__(self, cin, cout, k=3, relu=True):
    layers = [nn.Conv2d(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1)]
    super().__init__(*layers, *([nn.ReLU()] if relu else []))


class UNet2D(nn.Module):
  """models.UNet2D(base, levels) in PyTorch; module names are ours (enc1_0, dec1_up, ...)."""

  def __init__(self, base=16, levels=5, cin=3):
    super().__init__()
    self.levels = levels
    widths = [base * 2 ** i for i in range(levels)]
    blocks, c = {}, cin
    for level, w in enumerate(widths, start=1):
      blocks[f'enc{level}_0'] = ConvBN(c, w, relu=False)
      blocks[f'enc{level}_1'] = ConvBN(w, w)
      blocks[f'enc{level}_2'] = ConvBN(w, w)
      c = w
    for i, w in enumerate(reversed(widths[1:])):
      if i > 0:
        blocks[f'dec{i + 1}_in'] = ConvBN(c, w)
      blocks[f'dec{i + 1}_up'] = ConvBN(w, w // 2, k=1)
      blocks[f'dec{i + 1}_out'] = ConvBN(w, w)
      c = w
    self.blocks = nn.ModuleDict(blocks)
    self.head = nn.Conv2d(c, 1, 1)

  def forward(self, x):
    b, skips = self.blocks, []
    for level in range(1, self.levels + 1):
      if level > 1:
        x = nn.functional.max_pool2d(x, 2)
      for j in range(3):
        x = b[f'enc{level}_{j}'](x)
      skips.append(x)
    for i in range(self.levels - 1):
      if i > 0:
        x = b[f'dec{i + 1}_in'](x)
      x = b[f'dec{i + 1}_up'](nn.functional.interpolate(x, scale_factor=2, mode='nearest'))
      x = b[f'dec{i + 1}_out'](torch.cat([skips[self.levels - 2 - i], x], 1))
    return self.head(x)


def load_flax(net: UNet2D, params, batch_stats) -> UNet2D:
  """Copy our parameters (flax, HWIO kernels) and BatchNorm statistics into ``net``."""
  t = lambda a: torch.from_numpy(np.array(a, np.float32))
  with torch.no_grad():
    for name, block in net.blocks.items():
      conv, bn = block[0], block[1]
      conv.weight.copy_(t(params[name]['conv']['kernel']).permute(3, 2, 0, 1))
      conv.bias.copy_(t(params[name]['conv']['bias']))
      bn.weight.copy_(t(params[name]['bn']['scale']))
      bn.bias.copy_(t(params[name]['bn']['bias']))
      bn.running_mean.copy_(t(batch_stats[name]['bn']['mean']))
      bn.running_var.copy_(t(batch_stats[name]['bn']['var']))
    net.head.weight.copy_(t(params['head']['kernel']).permute(3, 2, 0, 1))
    net.head.bias.copy_(t(params['head']['bias']))
  return net


def dice_bce(logits, labels):
  """Per image: 0.5 BCE + 0.5 (1 - soft Dice), smooth 1e-6 (losses.dice_bce)."""
  axes = tuple(range(1, logits.dim()))
  bce = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction='none').mean(axes)
  p = torch.sigmoid(logits)
  dice = (2 * (p * labels).sum(axes) + 1e-6) / (p.sum(axes) + labels.sum(axes) + 1e-6)
  return 0.5 * bce + 0.5 * (1 - dice)


def device() -> torch.device:
  """The anchor's device: the first CUDA GPU torch sees, else the CPU."""
  if torch.cuda.is_available():
    torch.backends.cudnn.benchmark = True
    return torch.device('cuda')
  return torch.device('cpu')


def _sync():
  if torch.cuda.is_available():
    torch.cuda.synchronize()


def _timed(fn, repeats):
  fn()   # warm up (and cudnn.benchmark's search)
  _sync()
  start = time.perf_counter()
  for _ in range(repeats):
    fn()
  _sync()
  return (time.perf_counter() - start) / repeats


def train_step_rate(k, b, s, base, levels, repeats, weight_decay=5e-4):
  """images/s of one training step of K clients (a loop: one model and one Adam each)."""
  torch.manual_seed(0)
  dev = device()
  nets = [UNet2D(base, levels).to(dev).train() for _ in range(k)]
  opts = [torch.optim.Adam(n.parameters(), lr=1e-3, weight_decay=weight_decay) for n in nets]
  x = torch.rand(k, b, 3, s, s, device=dev)
  y = (x[:, :, :1] > 0.5).float()

  def step():
    for net, opt, xi, yi in zip(nets, opts, x, y):
      opt.zero_grad()
      dice_bce(net(xi), yi).mean().backward()
      opt.step()
  return k * b / _timed(step, repeats)


def fisher_rate(n, s, base, levels, repeats):
  """examples/s of the per-example squared-gradient sum (BCE, inference-mode BatchNorm)
  by torch.func.vmap(grad), as fisher.diagonal."""
  from torch.func import functional_call, grad, vmap
  torch.manual_seed(0)
  net = UNet2D(base, levels).to(device()).eval()
  params = {k: v.detach() for k, v in net.named_parameters()}
  buffers = {k: v.detach() for k, v in net.named_buffers()}
  x = torch.rand(n, 3, s, s, device=params['head.weight'].device)
  y = (x[:, :1] > 0.5).float()

  def loss(p, xi, yi):
    logits = functional_call(net, (p, buffers), (xi[None],))
    return nn.functional.binary_cross_entropy_with_logits(logits, yi[None])

  per_example = vmap(grad(loss), in_dims=(None, 0, 0))

  def fisher():
    with torch.no_grad():
      return {k: g.square().sum(0) for k, g in per_example(params, x, y).items()}
  return n / _timed(fisher, repeats)
