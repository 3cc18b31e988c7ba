#!/usr/bin/env bash
# Set up (if needed), lint, run the whole test suite, then the container test (docker compose up).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check training export server bundle bench tests
.venv/bin/python -m pytest "$@"
bash scripts/docker_test.sh
