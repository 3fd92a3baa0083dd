"""The run report: ``build(workdir)`` writes report.md and report.html.

Everything comes from what a run saved in its workdir (config.json, results.md,
``<method>/seed<k>/metrics.jsonl`` and the last checkpoint), so a report can be
rebuilt without retraining (``python experiments/report.py --workdir=...``).
Pictures (PNG, in ``<workdir>/report/``):

* ``dice_curves.png``: val Dice vs round per client, one line per method (mean
  over seeds);
* ``local_layers.png``: for pfl_resfim (else FedCAC), the fraction of entries kept
  local per layer: layers x clients at the last round, and layers x rounds
  (mean over clients);
* ``predictions.png``: per client, test images with their label and the
  prediction of the last checkpoint's model (of pfl_resfim if it ran, else the
  first method), seed = the first one.

report.html holds the same with the pictures inline (base64). The PNGs are written
with an adaptive palette of ``report.colours`` colours (64 by default: a third of the
full-colour file's bytes for the same picture; 0 keeps full colour).
"""
from __future__ import annotations

import base64
import glob
import html
import io
import json
import logging
import os
import re
from typing import Dict, List

import numpy as np

from pflresfim_jax import config as config_lib

log = logging.getLogger('pflresfim_jax')

COLOURS = 64   # PNG palette size when a config does not say (config.report.colours)


def load_metrics(workdir: str) -> Dict[str, Dict[int, List[dict]]]:
  """``{method: {seed: [round records]}}`` from every ``<method>/seed<k>/metrics.jsonl``
  (the method as the records name it: a ``module:Class`` method's folder is a safe
  file name, build.method_folder)."""
  runs: Dict[str, Dict[int, List[dict]]] = {}
  for path in sorted(glob.glob(os.path.join(workdir, '*', 'seed*', 'metrics.jsonl'))):
    method = os.path.basename(os.path.dirname(os.path.dirname(path)))
    seed = int(os.path.basename(os.path.dirname(path))[4:])
    with open(path) as f:
      records = [json.loads(line) for line in f if line.strip()]
    if records:
      runs.setdefault(records[0].get('method', method), {})[seed] = records
  return runs


def _plt():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def save_png(fig, path: str, colours: int = COLOURS) -> None:
  """Write matplotlib ``fig`` to ``path`` as a PNG and close it.

  Args:
    fig: a matplotlib Figure (drawn at 80 dpi).
    path: the PNG's path.
    colours: > 0: an adaptive palette of that many colours (PIL's median cut, at most
      256); 0: full colour, as matplotlib writes it.
  """
  if colours:
    from PIL import Image
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=80)
    buf.seek(0)
    with Image.open(buf) as im:
      im.convert('RGB').quantize(colors=int(colours)).save(path, optimize=True)
  else:
    fig.savefig(path, dpi=80)
  _plt().close(fig)


def colours_of(config) -> int:
  """``config.report.colours`` (COLOURS for a config.json written before the field)."""
  return int(config.report.get('colours', COLOURS))


def _layer_order(name: str):
  """Encoder stages first, then the decoder from the bottom up, then the head."""
  m = re.match(r'(enc|dec)(\d+)_(\w+)', name)
  if m is None:
    return (2, 0, name)
  stage = int(m.group(2))
  return (0, stage, name) if m.group(1) == 'enc' else (1, -stage, name)


def dice_curves(runs, clients: List[str], path: str, colours: int = COLOURS) -> None:
  """Val Dice (%) vs round, a panel per client, a line per method (seed mean)."""
  plt = _plt()
  k = len(clients)
  cols = min(k, 3)
  rows = -(-k // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
  for method, per_seed in runs.items():
    n = min(len(r) for r in per_seed.values())
    dice = np.mean([[r['val']['dice'] for r in recs[:n]] for recs in per_seed.values()], 0)
    rounds = [r['round'] for r in next(iter(per_seed.values()))[:n]]
    for i in range(k):
      axes.flat[i].plot(rounds, 100 * dice[:, i], label=method)
  for i, ax in enumerate(axes.flat):
    if i >= k:
      ax.axis('off')
      continue
    ax.set_title(clients[i])
    ax.set_xlabel('round')
    ax.set_ylabel('val Dice (%)')
    ax.grid(alpha=0.3)
  axes.flat[0].legend(fontsize=7)
  fig.tight_layout()
  save_png(fig, path, colours)


def local_layers(records: List[dict], clients: List[str], method: str, path: str,
                 colours: int = COLOURS) -> bool:
  """Fraction kept local per layer (heat maps); False when the records hold none."""
  recs = [r for r in records if 'layer_fraction' in r]
  if not recs:
    return False
  plt = _plt()
  layers = sorted(recs[-1]['layer_fraction'], key=_layer_order)
  last = np.array([recs[-1]['layer_fraction'][n] for n in layers])               # [L, K]
  over = np.array([[np.mean(r['layer_fraction'][n]) for r in recs] for n in layers])  # [L, T]
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 0.18 * len(layers) + 2),
                             gridspec_kw={'width_ratios': [max(2, len(clients)), max(4, len(recs))]})
  for ax, values, xlabels, title in (
      (a, last, clients, f'{method}: kept local, last round'),
      (b, over, [str(r['round']) for r in recs], f'{method}: kept local, mean over clients')):
    im = ax.imshow(values, aspect='auto', cmap='viridis', vmin=0, vmax=max(1e-6, float(values.max())))
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels(layers, fontsize=6)
    ax.set_xticks(range(len(xlabels)))
    ax.set_xticklabels(xlabels, fontsize=7, rotation=90 if len(xlabels) > 12 else (45 if len(xlabels) > 3 else 0))
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
  b.set_xlabel('round')
  fig.tight_layout()
  save_png(fig, path, colours)
  return True


def predictions(workdir: str, config, fed, method: str, seed: int, path: str,
                examples: int = 1, colours: int = COLOURS) -> bool:
  """Image / label / prediction for ``examples`` test images per client; False if no checkpoint."""
  import jax
  import jax.numpy as jnp

  from pflresfim_jax import build as run_parts   # jax only when predictions are drawn
  from pflresfim_jax import checkpoint
  from pflresfim_jax.clients import sharding
  ckpt_dir = os.path.join(workdir, run_parts.method_folder(method), f'seed{seed}', 'checkpoints')
  if not os.path.isdir(ckpt_dir):
    return False
  ckpt = checkpoint.Checkpointer(ckpt_dir, config.checkpoint.every, config.checkpoint.keep)
  try:
    if ckpt.latest() is None:
      return False
    # The run may have padded its clients for D devices; the report uses one device.
    k_pad = int(ckpt.meta().get('clients_padded', fed.num_clients))
    algo = run_parts.algorithm(config, method, k_pad, fed.image_shape)
    one = sharding.replicated(sharding.client_mesh(1))
    key = jax.random.PRNGKey(0)
    abstract = {'fed': sharding.abstract(jax.eval_shape(algo.init, key), one),
                'key': sharding.abstract(key, one)}
    saved, meta = ckpt.restore_state(abstract)
  finally:
    ckpt.close()
  n = max(1, min(examples, int(fed.test.counts.min())))
  images = jnp.asarray(sharding.pad_clients(fed.test.images[:, :n], k_pad))
  predict = run_parts.predict_program(config, method, k_pad, fed.image_shape)
  probs = np.asarray(jax.nn.sigmoid(predict(saved['fed'], images)))
  plt = _plt()
  k = fed.num_clients
  fig, axes = plt.subplots(k, 3 * n, figsize=(2.2 * 3 * n, 2.2 * k), squeeze=False)
  for i in range(k):
    for j in range(n):
      img = fed.test.images[i, j]
      panels = (img[..., img.shape[-1] // 2], fed.test.labels[i, j, ..., 0],
                probs[i, j, ..., 0] > config.eval.threshold)
      for c, (title, panel) in enumerate(zip(('image', 'label', 'prediction'), panels)):
        ax = axes[i, 3 * j + c]
        ax.imshow(panel, cmap='gray', **({} if c == 0 else {'vmin': 0, 'vmax': 1}))
        ax.set_xticks([])
        ax.set_yticks([])
        if i == 0:
          ax.set_title(title, fontsize=8)
        if c == 0 and j == 0:
          ax.set_ylabel(fed.clients[i], fontsize=8)
  fig.suptitle(f'{method}, seed {seed}, model after round {meta["round"]}', fontsize=9)
  fig.tight_layout()
  save_png(fig, path, colours)
  return True


def _md_table_to_html(md: str) -> str:
  rows = [[c.strip() for c in line.strip().strip('|').split('|')]
          for line in md.splitlines() if line.strip().startswith('|') and not set(line) <= set('|-: ')]
  if not rows:
    return ''
  head = ''.join(f'<th>{html.escape(c)}</th>' for c in rows[0])
  body = ''.join('<tr>' + ''.join(f'<td>{html.escape(c)}</td>' for c in r) + '</tr>' for r in rows[1:])
  return f'<table border="1" cellpadding="4"><tr>{head}</tr>{body}</table>'


def build(workdir: str, config=None, fed=None) -> str:
  """Write ``report.md`` and ``report.html`` (+ PNGs in ``report/``); returns report.md's path.

  Args:
    workdir: a run's workdir.
    config: its resolved config (default: read from ``workdir/config.json``).
    fed: its federation (default: loaded again from the config; the phantom is
      regenerated, real data comes from the loaders' cache).
  """
  import ml_collections

  from pflresfim_jax import build as run_parts   # jax only when the federation is loaded
  if config is None:
    path = os.path.join(workdir, 'config.json')
    if not os.path.exists(path):
      raise FileNotFoundError(f'{path} not found: --workdir must be a folder written by '
                              'experiments/main.py')
    with open(path) as f:
      config = ml_collections.ConfigDict(json.load(f))
    if isinstance(config.data.image_size, list):
      config.data.image_size = tuple(config.data.image_size)
  if fed is None:
    fed = run_parts.load_federation(config)
  runs = load_metrics(workdir)
  if not runs:
    raise FileNotFoundError(f'no <method>/seed<k>/metrics.jsonl in {workdir}: nothing to report')
  colours = colours_of(config)
  pics_dir = os.path.join(workdir, 'report')
  os.makedirs(pics_dir, exist_ok=True)
  pictures = []
  dice_curves(runs, list(fed.clients), os.path.join(pics_dir, 'dice_curves.png'), colours)
  pictures.append(('Validation Dice per round', 'dice_curves.png'))
  # The first method whose mask changes by round (pfl_resfim first): its heat map.
  masked = next((m for m in sorted(runs, key=lambda m: (m != 'pfl_resfim', m))
                 if 'layer_fraction' in runs[m][min(runs[m])][-1]), None)
  if masked is not None:
    seed = min(runs[masked])
    if local_layers(runs[masked][seed], list(fed.clients), masked,
                    os.path.join(pics_dir, 'local_layers.png'), colours):
      pictures.append((f'Entries kept local per layer ({masked}, seed {seed})', 'local_layers.png'))
  shown = 'pfl_resfim' if 'pfl_resfim' in runs else next(iter(runs))
  seed = min(runs[shown])
  if predictions(workdir, config, fed, shown, seed, os.path.join(pics_dir, 'predictions.png'),
                 int(config.report.examples), colours):
    pictures.append((f'Test predictions ({shown}, seed {seed}, last checkpoint)', 'predictions.png'))
  table_path = os.path.join(workdir, 'results.md')
  table = open(table_path).read() if os.path.exists(table_path) else '(no results.md yet)\n'
  rounds = config.rounds
  intro = (f'Data: {"phantom" if config.data.root is None and not config.data.clients else config.data.name}, '
           f'{fed.num_clients} clients, {rounds} rounds, UNet base {config.model.base}. '
           f'Test Dice (%) recorded at each client\'s best val Dice in rounds '
           f'{config_lib.first_recorded_round(config)}..{rounds - 1}.')
  md = ['# Report', '', intro, '', '## Results', '', table.rstrip(), '']
  for title, name in pictures:
    md += [f'## {title}', '', f'![{title}](report/{name})', '']
  with open(os.path.join(workdir, 'report.md'), 'w') as f:
    f.write('\n'.join(md))
  parts = [f'<h1>Report</h1><p>{html.escape(intro)}</p><h2>Results</h2>{_md_table_to_html(table)}']
  for title, name in pictures:
    with open(os.path.join(pics_dir, name), 'rb') as f:
      data = base64.b64encode(f.read()).decode()
    parts.append(f'<h2>{html.escape(title)}</h2><img src="data:image/png;base64,{data}" '
                 f'alt="{html.escape(title)}">')
  with open(os.path.join(workdir, 'report.html'), 'w') as f:
    f.write('<!DOCTYPE html><html><head><meta charset="utf-8"><title>pflresfim_jax report</title>'
            '</head><body>' + '\n'.join(parts) + '</body></html>\n')
  return os.path.join(workdir, 'report.md')
