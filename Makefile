# The README's two commands: `make demo` (offline end-to-end demo) and `make test` (the test suite).
# Each sets up .venv on first use; nothing needs to be installed beforehand but python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test browser bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel; an unpinned torch would pull CUDA builds.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,zoo]'
	touch $@

# Debian's Chromium drives the browser tests (never a downloaded browser build).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q chromium chromium-driver; \
	  else sudo apt-get update -q && sudo apt-get install -y -q chromium chromium-driver; fi; }

demo: $(STAMP)
	$(BIN)/hf-merge demo

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/merge_speed.py
	$(BIN)/python benchmarks/merge_quality.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
