PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first, pinned, so pip takes the CPU build that lies on disk here; on a
# machine with a GPU, install the torch build you want into .venv before `make`.
TORCH_SPEC ?= torch==2.13.0

.PHONY: help venv install test lint typecheck clean

help:
	@echo "make test   - create .venv if missing, install with the dev extra, lint and run the tests"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"

$(VENV)/.installed-dev: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed-dev

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check model service tests
	$(BIN)/ruff format --check model service tests

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
