# Two commands on a fresh Linux machine with python3 >= 3.10:
#   make main   creates .venv and runs the main job (python -m recsys_mamba.train experiment=ctr)
#   make test   creates .venv and runs the default test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned, so pip takes the CPU build here instead of resolving a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup main test test-slow lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

main: setup
	$(PY) -m recsys_mamba.train experiment=ctr

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

lint: setup
	$(VENV)/bin/ruff check .
