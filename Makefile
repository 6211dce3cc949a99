# Set-up-free entry points: each target creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.runtime: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# The main job: a synthetic scene explained word by word with the embedded model.
demo: $(VENV)/.runtime
	$(BIN)/python -m tclip_jax.demo

test: $(VENV)/.test
	$(BIN)/python -m pytest -q
