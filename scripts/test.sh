#!/usr/bin/env bash
# Set up (if needed), lint, run the whole test suite, then the container test (docker compose up).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Headless Chromium and its WebDriver for the web page's browser test (Debian packages; skipped, saying so, where
# they cannot be installed).
if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
      || { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
           chromium-driver >/dev/null; }; } \
      || echo "could not install chromium: the browser test will be skipped"
fi
.venv/bin/ruff check training export server bundle pipeline bulk bench tests
.venv/bin/lint-imports  # the import contracts in pyproject.toml (server never imports torch, ...)
.venv/bin/python -m pytest "$@"
bash scripts/docker_test.sh
