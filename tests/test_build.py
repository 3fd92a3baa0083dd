"""build: the resolved config and what a run is made of."""
import os

import pytest

from pflresfim_jax import build, config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_methods_and_seeds():
  assert build.parse_methods('all') == list(config_lib.METHODS)
  assert build.parse_methods('fedavg, fedbn') == ['fedavg', 'fedbn']
  with pytest.raises(ValueError, match='fedfoo'):
    build.parse_methods('fedavg,fedfoo')
  assert build.parse_seeds('0,1,2') == [0, 1, 2] and build.parse_seeds(3) == [3]
  with pytest.raises(ValueError, match='config.seeds'):
    build.parse_seeds('a,b')
  spec = os.path.join(ROOT, 'examples', 'update_mask.py') + ':UpdateMask'
  assert build.parse_methods(f'fedavg,{spec}') == ['fedavg', spec]   # loaded, not only split
  with pytest.raises(ValueError, match='config.method'):
    build.parse_methods('fedavg,examples/none.py:X')


def test_method_folder_is_one_safe_name():
  assert build.method_folder('pfl_resfim') == 'pfl_resfim'
  assert build.method_folder('/a/b/my.py:Cls') == '_a_b_my.py_Cls'


def test_resolve_picks_phantom_or_paper_defaults():
  c = config_lib.base_config()
  r = build.resolve(c)
  assert r.rounds == c.phantom.rounds and r.model.base == c.phantom.model_base
  assert r.lr == c.phantom.lr
  c.data.root = '/somewhere'
  r = build.resolve(c)
  assert r.rounds == c.paper_rounds and r.model.base == 16 and r.lr == c.paper_lr
  c.rounds, c.lr = 7, 5e-4
  assert build.resolve(c).rounds == 7 and build.resolve(c).lr == 5e-4
  c.data.root = None
  assert build.resolve(c).lr == 5e-4      # an explicit lr wins on the phantom too
  c.engine.precision = 'fp8'
  with pytest.raises(ValueError, match='engine.precision'):
    build.resolve(c)


def test_compile_method_stores_the_builtin_methods_programs_on_disk_only(request, tmp_path):
  import jax
  from pflresfim_jax import compile_cache
  from tests.fed_helpers import tiny_config, tiny_fed
  before = jax.config.jax_compilation_cache_dir
  jax.config.update('jax_compilation_cache_dir', str(tmp_path))   # nothing compiles here
  request.addfinalizer(lambda: jax.config.update('jax_compilation_cache_dir', before))
  assert compile_cache.executables_folder() == os.path.join(str(tmp_path), compile_cache.EXECUTABLES)
  cfg, fed = build.resolve(tiny_config()), tiny_fed()
  init, round_fn = build.compile_method(cfg, fed, 'fedavg')
  assert isinstance(init, compile_cache.Stored) and isinstance(round_fn, compile_cache.Stored)
  assert round_fn.folder == compile_cache.executables_folder() and hasattr(round_fn, 'lower')
  spec = os.path.join(ROOT, 'examples', 'update_mask.py') + ':UpdateMask'
  build.parse_methods(spec)
  for config, method in ((cfg, spec), (build.resolve(tiny_config(compile_cache=False)), 'fedavg')):
    init, round_fn = build.compile_method(config, fed, method)   # compiled ahead, kept in memory
    assert init.folder is None and round_fn.folder is None
  # The report's prediction program is kept alike (a cached run's report loads it).
  predict = build.predict_program(cfg, 'fedavg', fed.num_clients, fed.image_shape)
  assert isinstance(predict, compile_cache.Stored) and predict.name == 'fedavg-predict'
  assert predict.folder == compile_cache.executables_folder()
  assert build.predict_program(cfg, spec, fed.num_clients, fed.image_shape).folder is None
  off = build.resolve(tiny_config(compile_cache=False))
  assert build.predict_program(off, 'fedavg', fed.num_clients, fed.image_shape).folder is None


def test_the_initial_state_compiles_at_init_options_on_cpu_with_the_same_bits(monkeypatch):
  import jax
  import numpy as np
  from tests.fed_helpers import tiny_config, tiny_fed
  with monkeypatch.context() as m:   # jax.distributed: each process compiles, none stores
    m.setattr(jax, 'process_count', lambda: 2)
    init, round_fn = build.compile_method(build.resolve(tiny_config()), tiny_fed(), 'fedbn')
    assert init.folder is None and not hasattr(round_fn, 'folder')
    assert jax.default_backend() != 'cpu' or init.compiler_options == build.INIT_OPTIONS
  init, _ = build.compile_method(build.resolve(tiny_config(compile_cache=False)), tiny_fed(), 'fedbn')
  assert jax.default_backend() != 'cpu' or init.compiler_options == build.INIT_OPTIONS
  key = jax.random.PRNGKey(7)
  # Stored's options against XLA's default level, 3 (the suite's conftest sets 0).
  got = init(key)
  want = init.jitted.lower(key).compile(compiler_options={'xla_backend_optimization_level': 3})(key)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_program_config_leaves_out_what_changes_no_program():
  from tests.fed_helpers import tiny_config
  base = build.program_config(build.resolve(tiny_config(rounds=4)))
  same = build.resolve(tiny_config(rounds=4, seeds='3,4', method='fedbn',
                                   **{'report.enabled': False, 'eval.record_from': 'after_half'}))
  assert build.program_config(same) == base
  assert build.program_config(build.resolve(tiny_config(rounds=4, batch_size=2))) != base
  assert 'seeds' not in base and 'batch_size' in base


@pytest.mark.parametrize('share', ['per_image', 'client_mean'])
def test_bank_spec_is_the_banks_shapes_dtypes_and_shardings(share):
  import jax
  from pflresfim_jax import compile_cache
  from tests.fed_helpers import tiny_config, tiny_fed
  cfg, fed = tiny_config(**{'spectral.share': share}), tiny_fed()
  bank, spec = build.spectral_bank(fed, cfg), build.bank_spec(fed, cfg)
  assert jax.tree.structure(bank) == jax.tree.structure(spec)
  for got, want in zip(jax.tree.leaves(bank), jax.tree.leaves(spec)):
    assert (got.shape, got.dtype, got.sharding) == (want.shape, want.dtype, want.sharding)
  # what Stored keys a program by: a program prepared for the spec serves the bank
  assert compile_cache._signature(*jax.tree.flatten(bank)) == compile_cache._signature(
      *jax.tree.flatten(spec))
