#!/usr/bin/env bash
# Set up everything this project needs on a fresh machine: Debian's Fashion-MNIST (real demo and test
# images) and a virtual environment in .venv with the project and its dependencies. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

PY=${PYTHON:-python3}
stamp=".venv/.installed-$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    [ -d .venv ] || "$PY" -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    # Pinned so pip takes the builds that lie on this kind of machine instead of downloading gigabytes.
    .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
    .venv/bin/pip install -q -e '.[dev]'
    # foolbox ships 20 real ImageNet JPEGs used as test photos; only its data files are read.
    .venv/bin/pip install -q --no-deps foolbox==3.3.4
    rm -f .venv/.installed-*
    touch "$stamp"
fi
