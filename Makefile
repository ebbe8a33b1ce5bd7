PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first and pinned: on these CPU machines pip takes the CPU build that lies
# on local disk; on a GPU machine PyPI's torch wheel for Linux brings its CUDA runtime.
TORCH_SPEC ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000
SERVE_ARGS ?=

.PHONY: help serve test lint typecheck pytest clean

help:
	@echo "make serve  - create .venv if missing, install, start the service on http://$(HOST):$(PORT)"
	@echo "make test   - create .venv if missing, install with the dev extra, lint and run the tests"
	@echo "make lint / typecheck / pytest - the parts of make test"
	@echo "make container-test - build the image offline on a local Docker engine and prove it (root, Debian)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

serve: $(VENV)/.installed
	$(BIN)/gptserve serve --host $(HOST) --port $(PORT) $(SERVE_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check model service tests benchmarks docker
	$(BIN)/ruff format --check model service tests benchmarks docker

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

pytest: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache

# Build the image offline on a real Docker engine and check it serves, streams and drains
# (root on Debian bookworm; see docker/README.md).
.PHONY: container-test
container-test:
	bash docker/container-test.sh
