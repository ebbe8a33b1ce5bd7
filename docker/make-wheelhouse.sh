#!/usr/bin/env bash
# Download every wheel the image needs into docker/wheelhouse/, for an offline build:
#   docker build --build-arg OFFLINE=1 -t gptserve .
# The wheels target the image, not this machine: CPython 3.11 (the Python of python:3.11-slim and
# of Debian bookworm) on x86_64 glibc Linux. Run it anywhere that pip can reach an index, then
# carry the repository, wheelhouse included, to the air-gapped builder.
#
#   docker/make-wheelhouse.sh                 # torch from PyPI: the CUDA build (several GB)
#   TORCH_SPEC='torch==2.13.0+cpu' docker/make-wheelhouse.sh \
#       --extra-index-url https://download.pytorch.org/whl/cpu     # CPU-only torch
#
# Extra arguments go to `pip download`. Environment: PYTHON (the pip to use, default python3),
# TORCH_SPEC, EXTRAS (default hub), WHEELHOUSE (default docker/wheelhouse), WHEELHOUSE_PYTHON
# (default 3.11). Wheels already present are not downloaded again.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest=${WHEELHOUSE:-$repo/docker/wheelhouse}
python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-torch>=2.4,<2.15}
extras=${EXTRAS:-hub}
py_version=${WHEELHOUSE_PYTHON:-3.11}

# pip takes the --platform tags literally, so list every manylinux level the base's glibc (2.36)
# can load.
platform_args=()
for platform in manylinux_2_36 manylinux_2_34 manylinux_2_28 manylinux_2_17 manylinux2014; do
    platform_args+=(--platform "${platform}_x86_64")
done

mkdir -p "$dest"
# The project itself is named so that pip resolves its dependencies. Its own wheel is not needed:
# the image builds it from the sources with setuptools, which is why setuptools and wheel are
# downloaded too.
"$python" -m pip download --dest "$dest" --only-binary=:all: "${platform_args[@]}" \
    --python-version "$py_version" --implementation cp --abi "cp${py_version/./}" \
    "$@" "$torch_spec" "${repo}[${extras}]" setuptools wheel

torch_wheels=("$dest"/torch-*.whl)
echo "wheelhouse: $(find "$dest" -name '*.whl' | wc -l) wheels, $(du -sh "$dest" | cut -f1)," \
    "torch: ${torch_wheels[*]##*/}"
