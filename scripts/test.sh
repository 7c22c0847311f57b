#!/usr/bin/env bash
# Install (if needed), lint, then run the whole test suite, slow real-weights tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check embedkit tests benchmarks
exec .venv/bin/python -m pytest -q "$@"
