#!/usr/bin/env bash
# Build the demo bundle: the recipe recipes/fashion_mnist_demo.yaml (the real PromptKD pipeline on real
# Fashion-MNIST photos with tiny towers, on a CPU), run in WORKDIR (default demo/).
#   bash scripts/build_demo_bundle.sh [WORKDIR] [--set KEY=VALUE ...]
# A second run does nothing; an interrupted one continues where it stopped. The bundle is WORKDIR/bundle.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-demo}
shift || true
exec "${PY:-.venv/bin/python}" -m pipeline run recipes/fashion_mnist_demo.yaml --set "run.workdir=$W" "$@"
