# gptserve: a batched GPT-2 text-generation server (see docker/README.md).
#
# GPU by default. The base is a slim Debian with CPython 3.11, and the CUDA runtime (cuBLAS, cuDNN,
# NCCL, ...) arrives inside PyPI's Linux torch wheel, through the nvidia-*-cu12 wheels it depends
# on. An nvidia/cuda base image would only ship a second copy of those libraries. The host supplies
# the driver alone, through the NVIDIA Container Toolkit (`docker run --gpus all`, compose's device
# reservation, or the Kubernetes device plugin). With no GPU visible the same image runs on CPU,
# because the server's default device is `auto`.
#
# Build arguments:
#   BASE_IMAGE       the base of the final image; needs python3 (3.11 for an offline
#                    wheelhouse), its venv module, and useradd.
#   BUILDER_IMAGE    the base of the build stage (default: BASE_IMAGE): the same Python, plus a
#                    C compiler (gcc, libc6-dev) for offline builds; online builds install gcc.
#   TORCH_SPEC       the torch requirement; the default follows pyproject.toml.
#   TORCH_INDEX_URL  online builds only: where torch comes from, for example
#                    https://download.pytorch.org/whl/cpu for the CPU-only variant (about 1 GB
#                    instead of about 6 GB).
#   OFFLINE          1: install only from docker/wheelhouse/ (docker/make-wheelhouse.sh fills it)
#                    with `pip --no-index`; nothing is fetched during the build.
#   EXTRAS           the package's optional extras to install (hub: load models by Hub name).
#
#   docker build -t gptserve .                                               # online, GPU
#   docker build -t gptserve:cpu \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .   # online, CPU only
#   docker/make-wheelhouse.sh && docker build --build-arg OFFLINE=1 -t gptserve .   # offline
#
# Run it:
#
#   docker run --gpus all -p 127.0.0.1:8000:8000 gptserve
#
# All configuration goes through GPTSERVE_* environment variables (`gptserve serve --help` lists
# them). Stop it with `docker stop -t 45` (or compose's `stop_grace_period`), which has to be
# longer than GPTSERVE_DRAIN_TIMEOUT (30 s by default). On SIGTERM the server stops taking new
# requests and lets in-flight ones finish. Docker's default of 10 s would kill streams that are
# still running.

ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG BUILDER_IMAGE=${BASE_IMAGE}

# ---------------------------------------------------------------- builder: a venv in /opt/venv
FROM ${BUILDER_IMAGE} AS builder

ARG OFFLINE=0
ARG TORCH_SPEC="torch>=2.4,<2.15"
ARG TORCH_INDEX_URL=""
ARG EXTRAS=hub
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN python3 -m venv /opt/venv

# Online builds get only the wheelhouse's README here. The wheels stay in this stage, and the
# final image copies just the venv.
COPY docker/wheelhouse/ /wheels/

# torch goes into its own layer because it is the largest download and changes least often.
RUN set -eu; \
    if [ "$OFFLINE" = 1 ]; then set -- --no-index --find-links /wheels; \
    elif [ -n "$TORCH_INDEX_URL" ]; then set -- --index-url "$TORCH_INDEX_URL"; \
    else set --; fi; \
    /opt/venv/bin/pip install --no-cache-dir "$@" "$TORCH_SPEC"

# README.md* is a glob so the build still works without a README; pyproject.toml names it.
COPY pyproject.toml README.md* /src/
COPY model /src/model
COPY service /src/service
# A real install rather than an editable one, so the package data (the BPE files and the bundled
# model) is copied into site-packages. Offline, the build backend (setuptools) also comes from
# the wheelhouse.
RUN set -eu; \
    if [ "$OFFLINE" = 1 ]; then set -- --no-index --find-links /wheels; else set --; fi; \
    /opt/venv/bin/pip install --no-cache-dir "$@" "/src[$EXTRAS]"; \
    /opt/venv/bin/python -c "import model, service.api.app"

# The compiled CPU decode step (model/native_decode.py), built here into the installed
# package for x86-64-v3 (AVX2), x86-64-v4 (AVX-512), x86-64-v4 with AVX512-VNNI (int8) and
# x86-64-v4 with AMX (bf16x3 float32 linears): the final image has no C compiler, and at
# start-up takes the best of these that its CPU runs. Online, a builder without a compiler gets
# gcc from apt; offline, a BUILDER_IMAGE with gcc has to supply it. Otherwise the image runs
# torch's decode step on CPUs, and says so in its start-up line. (Unpinned: any gcc of the
# base's Debian release will do, and it does not reach the final image.)
# hadolint ignore=DL3008
RUN set -eu; \
    if ! command -v cc >/dev/null && [ "$OFFLINE" != 1 ] && command -v apt-get >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi; \
    if command -v cc >/dev/null && [ "$(uname -m)" = x86_64 ]; then \
        /opt/venv/bin/python -m model.native_prebuild; \
    else \
        echo "no C compiler in the builder (or not x86_64): torch's CPU decode step only"; \
    fi

# ---------------------------------------------------------------- runtime
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="gptserve" \
      org.opencontainers.image.description="Batched GPT-2 text generation over HTTP" \
      org.opencontainers.image.licenses="MIT"

# compute,utility: what the NVIDIA runtime has to mount for CUDA and nvidia-smi. It is harmless
# without a GPU. PYTHONDONTWRITEBYTECODE: pip compiled everything at build time, and the user
# cannot write to the venv.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HOME=/home/gptserve \
    GPTSERVE_HOST=0.0.0.0 \
    GPTSERVE_PORT=8000

# /models is where other weights get mounted (read-only is enough), for example
# `-v ./my-model:/models/my-model:ro -e GPTSERVE_MODEL=/models/my-model`. There is no VOLUME
# instruction because it would create an anonymous volume on every run even when nothing is
# mounted there.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/gptserve gptserve \
    && mkdir /models

COPY --from=builder /opt/venv /opt/venv

# Numeric, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/gptserve
EXPOSE 8000
STOPSIGNAL SIGTERM
# Liveness only: /health is 200 while the process and its engine loop are alive (and while the
# model loads). Orchestrators route traffic on /ready instead.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/health' % os.environ.get('GPTSERVE_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["gptserve"]
CMD ["serve"]
