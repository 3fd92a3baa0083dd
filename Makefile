PYTHON ?= python3
CONFIG ?= configs/vessel.py

.PHONY: install test run bench lint

install:
	$(PYTHON) -m pip install -q -e '.[test]'

test: install
	$(PYTHON) -m pytest -q -n auto tests

run: install
	$(PYTHON) experiments/main.py --config=$(CONFIG)

bench: install
	$(PYTHON) experiments/benchmark.py --quick

lint:
	$(PYTHON) -m pyflakes pflresfim_jax experiments configs tests 2>/dev/null || $(PYTHON) -m compileall -q pflresfim_jax experiments configs tests
