# GPU server image: the same service on a CUDA runtime base with onnxruntime-gpu (CUDA and TensorRT execution
# providers), TensorRT's runtime and cuda-python, so it serves a bundle's TensorRT engine or its ONNX graphs
# on the GPU. Needs the NVIDIA Container Toolkit on the host (compose profile "gpu") and a driver for CUDA 13
# (R580 or newer). The CUDA runtime, cuBLAS, cuDNN and TensorRT libraries come as pip wheels pinned in
# docker/gpu-constraints.txt (one CUDA major), so the base needs only Python: the CUDA base image is the default.
# Building needs pypi.nvidia.com: tensorrt-cu13-libs is a stub that fetches its wheel from there.
ARG BASE_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PROMPTKD_PROVIDERS=auto

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml docker/requirements.py docker/server-constraints.txt docker/gpu-constraints.txt /tmp/build/
RUN python3 /tmp/build/requirements.py /tmp/build/pyproject.toml server gpu \
        | grep -v '^onnxruntime>' > /tmp/build/requirements.txt \
    && grep -v '^onnxruntime==' /tmp/build/server-constraints.txt > /tmp/build/constraints.txt \
    && cat /tmp/build/gpu-constraints.txt >> /tmp/build/constraints.txt \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check -r /tmp/build/requirements.txt \
        -c /tmp/build/constraints.txt \
    && rm -rf /tmp/build \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin promptkd \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/promptkd/rollout  # PROMPTKD_ROLLOUT_STATE's volume, writable

WORKDIR /app
COPY bundle /app/bundle
COPY server /app/server

USER 10001
# 8000: HTTP (native API, Open Inference Protocol, /metrics); 8001: gRPC (Open Inference Protocol, grpc.health.v1).
ENV PROMPTKD_GRPC_HOST=0.0.0.0 PROMPTKD_GRPC_PORT=8001
EXPOSE 8000 8001
HEALTHCHECK --interval=5s --timeout=4s --start-period=120s --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"]
CMD ["/opt/venv/bin/uvicorn", "server.main:app", "--host", "0.0.0.0", "--port", "8000"]
