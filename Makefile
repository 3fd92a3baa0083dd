PYTHON ?= python3
CONFIG ?= configs/vessel.py

.PHONY: install test run bench lint

install:
	$(PYTHON) -m pip install -q -e '.[test]'

# The whole suite, then the float comparisons again with XLA limited to SSE4.2: XLA
# compiles for the host's instruction set, so tolerances must hold on any CPU.
test: install
	$(PYTHON) -m pytest -q -n auto --dist worksteal tests
	XLA_FLAGS=--xla_cpu_max_isa=SSE4_2 $(PYTHON) -m pytest -q -n auto --dist worksteal -m reference tests

run: install
	$(PYTHON) experiments/main.py --config=$(CONFIG)

bench: install
	$(PYTHON) experiments/benchmark.py --quick

lint:
	$(PYTHON) -m pyflakes pflresfim_jax experiments configs tests 2>/dev/null || $(PYTHON) -m compileall -q pflresfim_jax experiments configs tests
