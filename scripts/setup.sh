#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs oanet-jax with its pinned dependencies.
#   bash scripts/setup.sh          runtime dependencies
#   bash scripts/setup.sh --test   plus the test oracles (pytest, ruff, torch, torchvision)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
reqs=(-r requirements.txt)
if [ "${1:-}" = "--test" ]; then
  reqs+=(-r requirements-test.txt)
fi
.venv/bin/python -m pip install -q "${reqs[@]}"
# panopticapi's metadata pins numpy<2; its code needs only numpy and pillow and works with numpy 2.
.venv/bin/python -m pip install -q --no-deps -r requirements-nodeps.txt
.venv/bin/python -m pip install -q --no-deps -e .
echo "setup done: $(.venv/bin/python -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__)')"
