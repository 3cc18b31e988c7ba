# Training image: both stages, export, and torchrun for several GPUs (PyTorch's wheels carry their own CUDA
# libraries; the host needs the NVIDIA driver and Container Toolkit). It also builds the demo bundle for
# `docker compose up` (Fashion-MNIST comes from Debian's dataset-fashion-mnist package).
#
# TORCH_FIND_LINKS: a folder URL holding torch/torchvision wheels and their dependencies, for offline or
# mirrored builds (pip then uses only that); empty: PyPI.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_FIND_LINKS=
ENV PYTHONUNBUFFERED=1 \
    PY=/opt/venv/bin/python \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv \
    && if [ -n "$TORCH_FIND_LINKS" ]; then \
        pip install --no-cache-dir --disable-pip-version-check --no-index --find-links "$TORCH_FIND_LINKS" \
            torch==2.14.1 torchvision==0.29.1; \
    else \
        pip install --no-cache-dir --disable-pip-version-check torch==2.14.1 torchvision==0.29.1; \
    fi
COPY pyproject.toml docker/requirements.py /tmp/build/
RUN python3 /tmp/build/requirements.py /tmp/build/pyproject.toml export > /tmp/build/requirements.txt \
    && pip install --no-cache-dir --disable-pip-version-check -r /tmp/build/requirements.txt \
    && rm -rf /tmp/build

WORKDIR /app
COPY training /app/training
COPY export /app/export
COPY bundle /app/bundle
COPY pipeline /app/pipeline
COPY server /app/server
COPY recipes /app/recipes
COPY scripts /app/scripts
CMD ["python", "-m", "training", "--help"]
