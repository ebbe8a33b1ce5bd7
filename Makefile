PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first, pinned, from wherever pip is configured to look: PyPI's Linux wheel
# brings its CUDA libraries (several GB); TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# takes the CPU-only build instead (about 200 MB).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
HOST ?= 127.0.0.1
PORT ?= 8000
SERVE_ARGS ?=
# make bundled-model: where the run goes, and extra `gptserve train` flags (such as --resume).
BUNDLED_RUN ?= runs/bundled
TRAIN_ARGS ?=
BUNDLED_DIR := model/assets/bundled

.PHONY: help serve test lint typecheck pytest clean bundled-model

help:
	@echo "make serve  - create .venv if missing, install, start the service on http://$(HOST):$(PORT)"
	@echo "make test   - create .venv if missing, install with the dev extra, lint and run the tests"
	@echo "make lint / typecheck / pytest - the parts of make test"
	@echo "make bundled-model - train the bundled model again from data/ (about 35 min on 2 CPU cores)"
	@echo "make container-test - build the image offline on a local Docker engine and prove it (root, Debian)"

$(BIN)/python:
	@echo "==> creating the virtual environment $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	@echo "==> installing $(TORCH_SPEC) (the largest download: a few minutes the first time)"
	$(BIN)/python -c "import torch" 2>/dev/null || \
		$(BIN)/pip install $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) "$(TORCH_SPEC)"

$(VENV)/.installed: $(BIN)/python pyproject.toml
	@echo "==> installing gptserve and its dependencies into $(VENV)"
	$(BIN)/pip install -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	@echo "==> installing the dev tools (ruff, mypy, pytest, transformers, openai)"
	$(BIN)/pip install -e '.[dev]'
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

# Train the bundled model again, as docs/bundled-model.md describes: check the corpus against its
# SHA-256, train into $(BUNDLED_RUN), then copy the checkpoint (not the resume state) into the
# package. A finished or interrupted run in $(BUNDLED_RUN) is kept: delete the folder to start
# over, or pass TRAIN_ARGS=--resume to continue it.
bundled-model: $(VENV)/.installed
	@echo "==> checking data/tinyshakespeare.txt against data/SHA256SUMS"
	$(BIN)/python -c "import hashlib; want = open('data/SHA256SUMS').read().split()[0]; \
		got = hashlib.sha256(open('data/tinyshakespeare.txt', 'rb').read()).hexdigest(); \
		raise SystemExit(0 if got == want else f'data/tinyshakespeare.txt: SHA-256 {got}, expected {want}')"
	$(BIN)/gptserve train --data data/tinyshakespeare.txt --out-dir $(BUNDLED_RUN) --n-layer 4 --n-head 4 --n-embd 128 --block-size 256 --dropout 0.1 --batch-size 8 --max-iters 800 --learning-rate 0.002 --min-lr 0.0002 --warmup-iters 50 --eval-interval 50 --eval-batches 8 --seed 1337 --num-threads 2 $(TRAIN_ARGS)
	cp $(BUNDLED_RUN)/gptserve.json $(BUNDLED_RUN)/model.safetensors $(BUNDLED_DIR)/
	@echo "==> $(BUNDLED_DIR) now holds the model trained in $(BUNDLED_RUN)"

# Build the image offline on a real Docker engine and check it serves, streams and drains
# (root on Debian bookworm; see docker/README.md).
.PHONY: container-test
container-test:
	bash docker/container-test.sh
