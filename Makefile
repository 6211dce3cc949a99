# Set-up-free entry points: each target creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.runtime: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# The explorer's browser tests drive Debian's chromium through its chromedriver: installed here, quietly, when
# missing (as root, or with passwordless sudo); where that is impossible the browser tests fail and say why.
BROWSER_PACKAGES := chromium chromium-driver
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  echo "installing Debian's chromium and chromium-driver for the browser tests (apt-get)"; \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
	  export DEBIAN_FRONTEND=noninteractive; \
	  { $$sudo apt-get install -y -qq $(BROWSER_PACKAGES) || { $$sudo apt-get update -qq && \
	    $$sudo apt-get install -y -qq $(BROWSER_PACKAGES); }; } >/dev/null 2>&1 || \
	  echo "could not install them (apt-get needs root); the browser tests will fail"; \
	fi

# The main job: a synthetic scene explained word by word with the embedded model.
demo: $(VENV)/.runtime
	$(BIN)/python -m tclip_jax.demo

test: $(VENV)/.test browser
	$(BIN)/python -m pytest -q
