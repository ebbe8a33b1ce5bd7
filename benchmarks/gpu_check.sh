#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script to run on a GPU machine; CI never runs it.
#
#   bash benchmarks/gpu_check.sh              # python3 that has a CUDA torch (the GPU image's)
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
#
# 1. The CUDA tests: loading onto the GPU, and the decode CUDA graphs giving eager's greedy tokens.
# 2. The engine benchmark on the GPU: gpt2 (random weights) in bfloat16 at 1, 64 and
#    256 concurrent requests, eager and with --fast-decode (CUDA graphs).
# Needs only torch, tiktoken, safetensors, numpy, tqdm, pytest and transformers (the tests'
# conftest imports it): the engine imports no FastAPI. Writes the outputs to $OUT when set.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1

"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_decode_graphs.py \
    "tests/test_loading.py::test_load_model_on_cuda" 2>&1 | tee "$OUT/gpu-tests.txt"
for fast in "" "--fast-decode"; do
    "$PYTHON" benchmarks/engine_bench.py --device cuda --dtype bfloat16 --levels 1,64,256 \
        --max-prefill-tokens 8192 $fast 2>&1 | tee -a "$OUT/gpu-bench.txt"
done
