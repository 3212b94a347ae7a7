# Two commands do all set-up on a fresh machine:
#   make run   -- create .venv, install pinned dependencies, pull the default model, start the
#                 OpenAI-compatible server on 127.0.0.1:$(PORT) (Ctrl-C stops it)
#   make test  -- create .venv, install pinned dependencies (and Debian's chromium for the browser
#                 test, when run as root), build llama.cpp's measuring tools once (the peer), run the tests
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PROMPT ?= Explain in two sentences why the sky is blue.
PORT ?= 8000

.PHONY: setup run generate test test-slow browser peers test-peers clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: setup
	$(VENV)/bin/effinfer pull
	$(VENV)/bin/effinfer serve --port $(PORT)

generate: setup
	$(VENV)/bin/effinfer generate --chat "$(PROMPT)" --max-tokens 96

# Debian's chromium for the chat-page browser test; without root the test is skipped, not failed.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "note: chromium not installed; the browser test will be skipped"

# llama.cpp's own tools, the peer that `effinfer bench` measures beside effinfer (built once, ~7 minutes on
# 2 cores; the tests use the three measuring tools, `make peers` builds llama-server and llama-perplexity too).
peers: setup
	bash benchmarks/build_llamacpp.sh

test-peers: setup
	bash benchmarks/build_llamacpp.sh llama-bench llama-batched-bench llama-quantize || \
		echo "note: llama.cpp's tools could not be built (above); the tests that run them will be skipped"

test: setup browser test-peers
	$(PY) -m pytest -q

# The 1.5B model's tests and the llama-cpp-python peer (its install compiles llama.cpp, ~6 minutes once).
test-slow: setup
	$(PY) -c "import llama_cpp" 2>/dev/null || $(PY) -m pip install --quiet --disable-pip-version-check "llama-cpp-python==0.3.36"
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) .pytest_cache
