import os
import sys

# Tests run on the CPU whatever the machine has. The models in the tests are tiny, so
# XLA's compile time dominates: skip its expensive backend optimisations.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('XLA_FLAGS', '--xla_backend_optimization_level=0')
sys.path.insert(0, os.path.dirname(__file__))
