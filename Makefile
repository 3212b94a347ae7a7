# Two commands do all set-up on a fresh machine:
#   make run   -- create .venv, install pinned dependencies, pull the default model, run a generation
#   make test  -- create .venv, install pinned dependencies, run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PROMPT ?= Explain in two sentences why the sky is blue.

.PHONY: setup run test test-slow clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: setup
	$(VENV)/bin/effinfer pull
	$(VENV)/bin/effinfer generate --chat "$(PROMPT)" --max-tokens 96

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) .pytest_cache
