#!/usr/bin/env bash
# Set up, build the Fashion-MNIST demo bundle (once) and serve it on http://127.0.0.1:${PORT:-8000}.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ -f demo/bundle/manifest.json ] || bash scripts/build_demo_bundle.sh demo
PROMPTKD_BUNDLE=${PROMPTKD_BUNDLE:-demo/bundle} exec .venv/bin/uvicorn server.main:app \
    --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}"
