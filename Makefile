# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test lint demo bench bench-quick clean compat stress

setup: $(STAMP)

# torch==2.13.0 first: it is the local CPU wheel; a bare `torch` requirement would pull a CUDA build.
# setup.py ships the tq_loader_alias.pth start-up hook (TQ_LOADER_ALIAS_TRANSFER_QUEUE=1) with the package.
$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: setup
	$(BIN)/ruff check tq_loader tests examples benchmarks tutorial docs/gen_configuration.py compat
	$(BIN)/ruff format --check tq_loader tests examples benchmarks tutorial docs/gen_configuration.py compat

demo: setup
	$(BIN)/tq-loader demo

# The benchmark suite (tq_loader/bench, = `tq-loader bench`): Markdown, JSON and PNGs under
# benchmarks/results/. `bench` installs TransferQueue 0.1.11 into .venv-tq when it is missing;
# `bench-quick` (tiny sizes, < 1 minute; run by `make test` through tests/test_benchmarks.py) never does.
bench: setup
	$(BIN)/python -m tq_loader.bench

bench-quick: setup
	$(BIN)/python -m tq_loader.bench --quick

# The long load run of the reliability suite (minutes; CI runs the short one inside `make test`).
stress: setup
	TQ_LOADER_STRESS=1 $(BIN)/python -m pytest -q -s -p no:cacheprovider tests/reliability/test_load.py

# TransferQueue 0.1.11 in its own venv, only for the tutorials and tests its wheel ships (and the
# reference run: `$(BIN)/python -m compat.run --against transferqueue`). torch first, as above.
TQ_VENV := .venv-tq
TQ_STAMP := $(TQ_VENV)/.installed

$(TQ_STAMP):
	test -x $(TQ_VENV)/bin/python || $(PY) -m venv $(TQ_VENV)
	$(TQ_VENV)/bin/pip install -q --upgrade pip
	$(TQ_VENV)/bin/pip install -q torch==2.13.0
	$(TQ_VENV)/bin/pip install -q 'TransferQueue[test]==0.1.11' pytest-timeout
	touch $(TQ_STAMP)

compat: setup $(TQ_STAMP)
	$(BIN)/python -m compat.run

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
