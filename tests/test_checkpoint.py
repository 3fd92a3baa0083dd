import errno
import json
import os
from collections import namedtuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pflresfim_jax import checkpoint, config as config_lib


def _state(v):
  return {'params': {'w': jnp.full((3, 2, 2), v, jnp.float32)}, 'step': jnp.int32(v),
          'personal': {}, 'key': jax.random.PRNGKey(7)}


def test_save_restore_round_trip_and_keep(tmp_path):
  bank = {'windows': jnp.arange(12.0).reshape(2, 1, 3, 2), 'owner': jnp.array([0, 1], jnp.int32)}
  ck = checkpoint.Checkpointer(str(tmp_path / 'ckpt'), every=2, keep=2)
  assert ck.latest() is None
  assert [r for r in range(7) if ck.due(r, 7)] == [1, 3, 5, 6]
  meta = {'round': 0, 'best_val': [0.25, float(np.float32(0.1))], 'recorded': {}}
  for r in (1, 3, 5):
    ck.save(r, _state(r), bank, {**meta, 'round': r})
  ck.save(5, _state(99), bank, meta)       # a second save of the same round is a no-op
  ck.close()
  ck = checkpoint.Checkpointer(str(tmp_path / 'ckpt'), every=2, keep=2)
  assert ck.latest() == 5
  assert sorted(int(d) for d in os.listdir(tmp_path / 'ckpt') if d.isdigit()) == [3, 5]
  state, got_bank, got_meta = ck.restore(jax.eval_shape(lambda: _state(0)), jax.eval_shape(lambda: bank))
  assert float(state['params']['w'][2, 1, 1]) == 5.0 and int(state['step']) == 5
  assert state['params']['w'].dtype == jnp.float32 and state['personal'] == {}
  np.testing.assert_array_equal(state['key'], jax.random.PRNGKey(7))
  np.testing.assert_array_equal(got_bank['windows'], bank['windows'])
  assert got_meta['round'] == 5 and np.float32(got_meta['best_val'][1]) == np.float32(0.1)
  old, _, _ = ck.restore(jax.eval_shape(lambda: _state(0)), jax.eval_shape(lambda: bank), step=3)
  assert int(old['step']) == 3
  ck.close()
  with pytest.raises(ValueError, match='checkpoint.every'):
    checkpoint.Checkpointer(str(tmp_path / 'x'), every=0, keep=1)


def test_config_diff_names_fields_and_ignores_bookkeeping():
  a = json.loads(config_lib.base_config().to_json_best_effort())
  b = json.loads(config_lib.base_config().to_json_best_effort())
  assert checkpoint.config_diff(a, b) == []
  a['lr'], b['lr'], b['resfim']['ratio'] = 0.001, 0.5, 0.3
  b['method'], b['seeds'], b['checkpoint']['every'], b['resume'] = 'fedavg', '0,1', 1, False
  diff = checkpoint.config_diff(a, b)
  assert len(diff) == 2 and diff[0].startswith('lr: 0.001') and diff[1].startswith('resfim.ratio: 0.2')
  b['data']['image_size'] = [256, 256]           # a list from JSON equals the tuple
  a['data']['image_size'] = (256, 256)
  assert len(checkpoint.config_diff(a, b)) == 2
  del b['fisher']['loss']
  assert any(d.startswith("fisher.loss: 'nll' in the workdir, '<absent>'") for d in checkpoint.config_diff(a, b))
  # A run written before a field existed (here model.levels): at its default now, the
  # field does not block a resume; set to anything else, it is named.
  defaults = json.loads(config_lib.base_config().to_json_best_effort())
  old, new = json.loads(config_lib.base_config().to_json_best_effort()), json.loads(config_lib.base_config().to_json_best_effort())
  del old['model']['levels']
  assert checkpoint.config_diff(old, new, defaults=defaults) == []
  assert checkpoint.config_diff(old, new) == ["model.levels: '<absent>' in the workdir, 5 now"]
  new['model']['levels'] = 3
  assert checkpoint.config_diff(old, new, defaults=defaults) == ["model.levels: 5 in the workdir, 3 now"]


def test_fresh_subfolder_never_reuses(tmp_path):
  assert checkpoint.fresh_subfolder(str(tmp_path)) == str(tmp_path / 'run-2')
  (tmp_path / 'run-2').mkdir()
  (tmp_path / 'run-3').mkdir()
  assert checkpoint.fresh_subfolder(str(tmp_path)) == str(tmp_path / 'run-4')


def test_check_writable_errors(tmp_path, monkeypatch):
  checkpoint.check_writable(str(tmp_path / 'new' / 'dir'))
  assert (tmp_path / 'new' / 'dir').is_dir() and os.listdir(tmp_path / 'new' / 'dir') == []
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  with pytest.raises(ValueError, match='cannot write to the workdir .*file/run'):
    checkpoint.check_writable(str(blocker / 'run'))
  usage = namedtuple('usage', 'total used free')
  monkeypatch.setattr(checkpoint.shutil, 'disk_usage', lambda p: usage(10, 10, 2 ** 20))
  with pytest.raises(ValueError, match=r'1.0 MiB free, but the run needs about 8.0 MiB'):
    checkpoint.check_writable(str(tmp_path), need_bytes=8 * 2 ** 20)

  def read_only(*a, **k):
    raise OSError(errno.EROFS, 'Read-only file system')
  monkeypatch.setattr(checkpoint, 'open', read_only, raising=False)
  with pytest.raises(ValueError, match='read-only'):
    checkpoint.check_writable(str(tmp_path))


def test_tree_bytes():
  tree = {'a': jax.ShapeDtypeStruct((2, 3), jnp.float32), 'b': np.zeros(5, np.int8)}
  assert checkpoint.tree_bytes(tree) == 29
