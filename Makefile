# Fresh machine: `make run` (installs into .venv if needed, runs the offline quickstart) and `make test`
# (fast tests) or `make test-all`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# On the project's build machines these releases lie on local disk; elsewhere any torch>=2.2 works:
#   make install TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install run test test-all lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/cl-bench

# The fast lane (no subprocess, DDP, kill or browser tests); test-all runs everything (CI: .ci/run).
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check cl_bench tests scripts
	$(BIN)/ruff format --check cl_bench tests scripts

clean:
	rm -rf outputs multirun .pytest_cache
