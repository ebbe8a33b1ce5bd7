#!/usr/bin/env bash
# GGUF files (f32 and q8_0) of the random GPT-2 124M, with llama.cpp's own converter.
set -euo pipefail
PEERS=${GPTSERVE_PEERS:-$HOME/.cache/gptserve-peers}
tree=$(find "$PEERS/llama-src" -maxdepth 3 -name convert_hf_to_gguf.py -printf '%h\n' | head -n 1)
[[ -n $tree ]] || { echo "run build_llama.sh first"; exit 1; }
[[ -d $PEERS/gpt2-random ]] || { echo "run make_models.py first"; exit 1; }
mkdir -p "$PEERS/gguf"
for kind in f32 q8_0; do
  PYTHONPATH=$tree/gguf-py "$PEERS/vllm-venv/bin/python" "$tree/convert_hf_to_gguf.py" \
    "$PEERS/gpt2-random" --outtype "$kind" --outfile "$PEERS/gguf/gpt2-random-$kind.gguf" >/dev/null
done
ls -l "$PEERS/gguf"
