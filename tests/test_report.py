import json

import numpy as np

from pflresfim_jax import report

PNG = b'\x89PNG\r\n\x1a\n'


def _write_run(root, method, seed, rounds, k=2, layers=False):
  d = root / method / f'seed{seed}'
  d.mkdir(parents=True)
  rng = np.random.default_rng(seed)
  with open(d / 'metrics.jsonl', 'w') as f:
    for r in range(rounds):
      rec = {'round': r, 'val': {'dice': rng.random(k).tolist()}, 'test': {'dice': rng.random(k).tolist()}}
      if layers:
        rec['layer_fraction'] = {'head': rng.random(k).tolist(), 'dec1_up/conv': [0.2] * k,
                                 'enc2_0/conv': [0.1] * k, 'enc10_0/bn': [0.3] * k}
      f.write(json.dumps(rec) + '\n')


def test_load_metrics_and_pictures(tmp_path):
  _write_run(tmp_path, 'fedavg', 0, 3)
  _write_run(tmp_path, 'fedavg', 1, 3)
  _write_run(tmp_path, 'pfl_resfim', 0, 3, layers=True)
  (tmp_path / 'notarun').mkdir()
  runs = report.load_metrics(str(tmp_path))
  assert sorted(runs) == ['fedavg', 'pfl_resfim'] and sorted(runs['fedavg']) == [0, 1]
  assert [r['round'] for r in runs['pfl_resfim'][0]] == [0, 1, 2]
  report.dice_curves(runs, ['A', 'B'], str(tmp_path / 'curves.png'))
  assert (tmp_path / 'curves.png').read_bytes()[:8] == PNG
  assert report.local_layers(runs['pfl_resfim'][0], ['A', 'B'], 'pfl_resfim', str(tmp_path / 'l.png'))
  assert (tmp_path / 'l.png').read_bytes()[:8] == PNG
  assert not report.local_layers(runs['fedavg'][0], ['A', 'B'], 'fedavg', str(tmp_path / 'x.png'))
  assert not (tmp_path / 'x.png').exists()


def test_pictures_are_written_with_the_palette_asked_for(tmp_path):
  from PIL import Image
  _write_run(tmp_path, 'fedavg', 0, 5, k=3)
  runs = report.load_metrics(str(tmp_path))
  sizes = {}
  for colours in (0, 16, 64):
    path = tmp_path / f'c{colours}.png'
    report.dice_curves(runs, ['A', 'B', 'C'], str(path), colours=colours)
    with Image.open(path) as im:
      im.load()
      if colours:
        assert im.mode == 'P' and len(im.getcolors(256)) <= colours
      else:
        assert im.mode == 'RGBA' and len(im.getcolors(1 << 16)) > 64   # antialiased lines
      sizes[colours] = path.stat().st_size
      shape = im.size
    assert shape == (3 * 4 * 80, 3 * 80)   # figsize (12, 3) inches at 80 dpi, either way
  assert sizes[16] < sizes[64] < sizes[0]
  from pflresfim_jax import config as config_lib   # one default, for configs with and without the field
  assert config_lib.base_config().report.colours == report.COLOURS == 64


def test_layer_order_is_the_models_order():
  names = ['head', 'dec1_up/conv', 'enc10_0/bn', 'dec4_up/conv', 'enc2_0/conv', 'enc1_1/bn']
  assert sorted(names, key=report._layer_order) == [
      'enc1_1/bn', 'enc2_0/conv', 'enc10_0/bn', 'dec4_up/conv', 'dec1_up/conv', 'head']


def test_markdown_table_to_html_escapes():
  md = '| method | A<b> | mean |\n|---|---|---|\n| fedavg | 1.00 ± 0.10 | 1.00 |\n'
  html = report._md_table_to_html(md)
  assert html.count('<tr>') == 2 and '<th>A&lt;b&gt;</th>' in html and '<td>1.00 ± 0.10</td>' in html


def test_build_needs_a_workdir(tmp_path):
  import pytest
  with pytest.raises(FileNotFoundError, match='config.json'):
    report.build(str(tmp_path))
