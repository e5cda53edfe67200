# The commands the README and CI use. Everything installs into .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU installs pin torch (a wheel for 2.13.0 CPU is what these machines have); on a GPU cluster
# override with e.g. `make install TORCH_SPEC=torch` to get the CUDA build of your choice.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
export OMP_NUM_THREADS ?= 1

.PHONY: install install-test demo test test-unit test-dist test-e2e test-slurm test-py312 lint bench clean

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

# The newest megatron-core (0.19.x, which needs Python 3.12, as cluster containers ship) in a venv
# of its own, .venv312, beside CI's Python 3.11 + megatron-core 0.16.1 in .venv. Runs the unit and
# distributed tiers. Python: pyenv's newest 3.12 (override with PYTHON312=/path/to/python3.12).
# Torch: the same release as CI's, from PyTorch's CPU index when it answers (about 200 MB), else
# from PyPI, whose Linux x86_64 wheel is a CUDA build (about 3 GB with its nvidia-* wheels; it
# runs on the CPU too). megatron-core: the newest release setup.cfg's range admits.
PYTHON312 ?= $(or $(lastword $(sort $(wildcard $(HOME)/.pyenv/versions/3.12.*/bin/python))),python3.12)
VENV312 ?= .venv312
BIN312 := $(VENV312)/bin
TORCH312_SPEC ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

$(BIN312)/python:
	$(PYTHON312) -m venv $(VENV312)
	$(BIN312)/python -m pip install --quiet --upgrade pip

$(VENV312)/.installed-test: $(BIN312)/python setup.cfg pyproject.toml
	$(BIN312)/pip install --quiet --retries 0 --timeout 20 --index-url $(TORCH_CPU_INDEX) "$(TORCH312_SPEC)" \
	  || { echo "test-py312: no torch from $(TORCH_CPU_INDEX); taking PyPI's (a CUDA build, runs on CPU)"; \
	       $(BIN312)/pip install --quiet "$(TORCH312_SPEC)"; }
	$(BIN312)/pip install --quiet --upgrade --upgrade-strategy only-if-needed -e ".[test]" megatron-core
	$(BIN312)/python -c "import sys, torch, importlib.metadata as m; \
	  print('py312 venv: python', sys.version.split()[0], '| torch', torch.__version__, \
	  '| megatron-core', m.version('megatron-core'))"
	touch $@

test-py312: $(VENV312)/.installed-test
	$(BIN312)/python -m pytest -q -p no:cacheprovider -m "unit or dist" $(PYTEST_ARGS)

# CI runs this before the tests: zero findings is the standard, not a goal.
lint: install-test
	$(BIN)/ruff check gkd_cli methods parallel scripts tests
	$(BIN)/ruff format --check gkd_cli methods parallel scripts tests
	$(BIN)/mypy gkd_cli methods parallel

bench: install-test
	$(BIN)/python scripts/bench.py

clean:
	rm -rf $(VENV) $(VENV312) .pytest_cache .ruff_cache .mypy_cache
