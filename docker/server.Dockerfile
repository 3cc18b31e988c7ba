# CPU server image: the FastAPI service, onnxruntime and OpenVINO (the CPU runtime it prefers), no torch, no
# training code. Serves PROMPTKD_MODEL_REPOSITORY (a folder of models and versions) or PROMPTKD_BUNDLE (one
# bundle), mounted read-only: set one (compose and the Kubernetes manifests do). Runs as a non-root user and works
# on a read-only root filesystem (give it a tmpfs at /tmp: large uploads are spooled there). /var/lib/promptkd/rollout
# belongs to that user, so a volume mounted there (PROMPTKD_ROLLOUT_STATE: rollout decisions) is writable: a named
# Docker volume takes the folder's owner when it is first mounted.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# glibc's malloc: two arenas and a fixed mmap threshold, so memory that decoding frees goes back to the system
# instead of piling up per thread (a flood of large images peaked at 597 MiB without these, 224 MiB with them,
# under a 160 MiB budget: see SECURITY.md).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MALLOC_ARENA_MAX=2 \
    MALLOC_MMAP_THRESHOLD_=131072

COPY pyproject.toml docker/requirements.py docker/server-constraints.txt /tmp/build/
RUN python3 /tmp/build/requirements.py /tmp/build/pyproject.toml server openvino > /tmp/build/requirements.txt \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check -r /tmp/build/requirements.txt \
        -c /tmp/build/server-constraints.txt \
    && rm -rf /tmp/build \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin promptkd \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/promptkd/rollout

WORKDIR /app
COPY bundle /app/bundle
COPY server /app/server

USER 10001
# 8000: HTTP (native API, Open Inference Protocol, /metrics); 8001: gRPC (Open Inference Protocol, grpc.health.v1).
ENV PROMPTKD_GRPC_HOST=0.0.0.0 PROMPTKD_GRPC_PORT=8001
EXPOSE 8000 8001
HEALTHCHECK --interval=5s --timeout=4s --start-period=60s --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"]
CMD ["/opt/venv/bin/uvicorn", "server.main:app", "--host", "0.0.0.0", "--port", "8000"]
