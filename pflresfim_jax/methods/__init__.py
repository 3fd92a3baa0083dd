"""The federated methods (METHOD.md 6), one module each, and the registry of their names.

``build(name, ctx)`` returns the :class:`Algorithm` of a method: the jittable
functions the trainer (train.py) and a deployment (deploy.py) run. A method is a
:class:`Method` (methods/base.py documents the protocol); the built-in ones:

  local, fedavg, siobn, fedbn, fedper, lg_fedavg   methods/simple.py (a static mask)
  fedprox   methods/fedprox.py      fedrep   methods/fedrep.py
  moon      methods/moon.py         pn       methods/pn.py
  fednova   methods/fednova.py      feddyn   methods/feddyn.py
  scaffold  methods/scaffold.py     fedawa   methods/fedawa.py
  fedlws    methods/fedlws.py       fedrdn   methods/fedrdn.py
  fedcac    methods/fedcac.py       ditto    methods/ditto.py
  fedrod    methods/fedrod.py       pfl_resfim  methods/pfl_resfim.py

A method from outside the package needs no edit here: ``register('name', MyMethod)``
from your own code, or name it as ``'package.module:MyMethod'`` or
``'path/to/file.py:MyMethod'`` (``--config.method=...``), where ``MyMethod`` is a
:class:`Method` subclass (or any ``ctx -> Method`` callable).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Callable, Dict, Tuple

from pflresfim_jax.config import METHODS
from pflresfim_jax.methods.base import (Algorithm, Context, Contract, Method, client_keys,
                                        compose, run_keys)
from pflresfim_jax.methods.ditto import Ditto
from pflresfim_jax.methods.fedawa import FedAWA
from pflresfim_jax.methods.fedcac import FedCAC
from pflresfim_jax.methods.fedlws import FedLWS
from pflresfim_jax.methods.feddyn import FedDyn
from pflresfim_jax.methods.fednova import FedNova
from pflresfim_jax.methods.fedrdn import FedRDN
from pflresfim_jax.methods.fedprox import FedProx
from pflresfim_jax.methods.fedrep import FedRep
from pflresfim_jax.methods.fedrod import FedRoD
from pflresfim_jax.methods.moon import MOON
from pflresfim_jax.methods.pfl_resfim import PFLResFIM
from pflresfim_jax.methods.pn import PN
from pflresfim_jax.methods.scaffold import Scaffold
from pflresfim_jax.methods.simple import FedAvg, FedBN, FedPer, LGFedAvg, Local, SiloBN

__all__ = ['Algorithm', 'Context', 'Contract', 'Method', 'build', 'builtin', 'client_keys', 'get',
           'names', 'register', 'run_keys']

Factory = Callable[[Context], Method]

_REGISTRY: Dict[str, Factory] = {
    'local': Local, 'fedavg': FedAvg, 'fedprox': FedProx, 'fednova': FedNova,
    'feddyn': FedDyn, 'scaffold': Scaffold, 'fedawa': FedAWA, 'fedlws': FedLWS,
    'fedrdn': FedRDN, 'moon': MOON, 'fedbn': FedBN, 'siobn': SiloBN,
    'fedper': FedPer, 'fedrep': FedRep, 'lg_fedavg': LGFedAvg, 'fedcac': FedCAC,
    'ditto': Ditto, 'fedrod': FedRoD, 'pn': PN, 'pfl_resfim': PFLResFIM,
}
assert tuple(_REGISTRY) == METHODS, 'config.METHODS lists the built-in methods in table order'


def register(name: str, factory: Factory) -> Factory:
  """Make ``name`` a method (usable as ``config.method``); returns ``factory``."""
  if not name or ',' in name or name == 'all':
    raise ValueError(f"a method name must be non-empty, without commas, not 'all': {name!r}")
  _REGISTRY[name] = factory
  return factory


def names() -> Tuple[str, ...]:
  """Every registered method name (built-ins first)."""
  return tuple(_REGISTRY)


def _load(spec: str) -> Factory:
  """``'module:Attr'`` or ``'file.py:Attr'`` -> the object it names."""
  where, _, attr = spec.rpartition(':')
  try:
    if where.endswith('.py'):
      if not os.path.isfile(where):
        raise FileNotFoundError(f'{where} not found')
      module_name = 'pflresfim_user_' + os.path.splitext(os.path.basename(where))[0]
      module = sys.modules.get(module_name)
      if module is None or getattr(module, '__file__', None) != os.path.abspath(where):
        loader = importlib.util.spec_from_file_location(module_name, os.path.abspath(where))
        module = importlib.util.module_from_spec(loader)
        sys.modules[module_name] = module
        loader.loader.exec_module(module)
    else:
      module = importlib.import_module(where)
    return getattr(module, attr)
  except (ImportError, AttributeError, FileNotFoundError) as e:
    raise ValueError(f'config.method: cannot load {spec!r} ({e})') from None


def get(name: str) -> Factory:
  """The factory of a registered name or a ``'module:Attr'`` / ``'file.py:Attr'`` spec."""
  if name in _REGISTRY:
    return _REGISTRY[name]
  if ':' in name:
    factory = _load(name)
    if not callable(factory) or (isinstance(factory, type) and not issubclass(factory, Method)):
      raise ValueError(f'config.method: {name!r} is not a Method class or factory')
    return register(name, factory)
  raise ValueError(f'config.method: unknown method {name!r}; choose from '
                   f'{", ".join(names())} (or all), or name your own as module:Class')


def builtin(name: str) -> bool:
  """Whether ``name`` is one of the package's own methods (not replaced by register)."""
  factory = _REGISTRY.get(name)
  return name in METHODS and getattr(factory, '__module__', '').startswith('pflresfim_jax.')


def build(name: str, ctx: Context) -> Algorithm:
  """The :class:`Algorithm` of method ``name`` for the run described by ``ctx``."""
  method = get(name)(ctx)
  if not isinstance(method, Method):
    raise ValueError(f'config.method: {name!r} made a {type(method).__name__}, not a Method')
  return compose(method)
