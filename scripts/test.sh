#!/usr/bin/env bash
# Install (if needed), lint and type-check, then run the whole test suite, slow real-weights tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The browser tests of `embedkit serve` drive a real headless Chromium (Playwright cannot
# download its own here). Debian's package, once; a missing browser fails those tests.
if [ -z "${EMBEDKIT_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1 \
   && ! command -v chromium-browser >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Chromium for the browser tests (apt-get install chromium)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
      > .venv/chromium-install.log 2>&1 || { tail -n 20 .venv/chromium-install.log; exit 1; }
  else
    echo "no Chromium found: install it (apt-get install -y chromium) or set EMBEDKIT_CHROMIUM" >&2
  fi
fi
.venv/bin/ruff check embedkit tests benchmarks
.venv/bin/mypy embedkit
exec .venv/bin/python -m pytest -q "$@"
