# The README's two commands: `make demo` (offline end-to-end demo) and `make test` (lint, types, the test suite).
# Each sets up .venv on first use; nothing needs to be installed beforehand but python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test browser zoo-data bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel; an unpinned torch would pull CUDA builds.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,zoo]'
	$(BIN)/python -m pip install -q --no-deps clip-anytorch==2.6.0 animal-mnist==0.4
	touch $@

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_INSTALL := $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q

# Debian's Chromium drives the browser tests (never a downloaded browser build).
browser:
	@command -v chromium >/dev/null 2>&1 || { $(APT_INSTALL) chromium chromium-driver; }

# The offline zoo's Fashion-MNIST and the fonts its printed digits are drawn with come from Debian
# (without the fonts the zoo still builds, with Pillow's built-in font and other numbers).
ZOO_DEBS := dataset-fashion-mnist fonts-dejavu-core fonts-liberation
zoo-data:
	@dpkg -s $(ZOO_DEBS) >/dev/null 2>&1 || { $(APT_INSTALL) $(ZOO_DEBS); }

demo: $(STAMP) zoo-data
	$(BIN)/hf-merge demo

# Lint and types first (the rule sets are in pyproject.toml), then the tests.
test: $(STAMP) browser zoo-data
	$(BIN)/ruff check hf_merge tests benchmarks
	$(BIN)/mypy hf_merge
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/merge_speed.py
	$(BIN)/python benchmarks/merge_quality.py
	$(BIN)/python benchmarks/download_speed.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
