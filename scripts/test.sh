#!/usr/bin/env bash
# Install (if needed), lint and type-check, then run the whole test suite, slow real-weights tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check embedkit tests benchmarks
.venv/bin/mypy embedkit
exec .venv/bin/python -m pytest -q "$@"
