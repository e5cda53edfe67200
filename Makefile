# The commands the README and CI use. Everything installs into .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU installs pin torch (a wheel for 2.13.0 CPU is what these machines have); on a GPU cluster
# override with e.g. `make install TORCH_SPEC=torch` to get the CUDA build of your choice.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
export OMP_NUM_THREADS ?= 1

.PHONY: install install-test demo test test-unit test-dist test-e2e test-slurm lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/gkd demo

test: install-test
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-unit: install-test
	$(BIN)/python -m pytest -q -m unit $(PYTEST_ARGS)

test-dist: install-test
	$(BIN)/python -m pytest -q -m dist $(PYTEST_ARGS)

test-e2e: install-test
	$(BIN)/python -m pytest -q -m e2e $(PYTEST_ARGS)

# The Slurm tier needs a running Slurm: `sudo .ci/slurm/start.sh` (two nodes on localhost), or
# `.ci/slurm/run.sh`, which installs Debian's slurm-wlm, starts it, runs this and stops it.
test-slurm: install-test
	$(BIN)/python -m pytest -q -m slurm tests/slurm $(PYTEST_ARGS)

# CI runs this before the tests: zero findings is the standard, not a goal.
lint: install-test
	$(BIN)/ruff check gkd_cli methods parallel scripts tests
	$(BIN)/ruff format --check gkd_cli methods parallel scripts tests
	$(BIN)/mypy gkd_cli methods parallel

bench: install-test
	$(BIN)/python scripts/bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
