#!/usr/bin/env bash
# The test command: installs what is missing, checks lint and format, runs the whole suite (CPU, gloo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PYTHON=${PYTHON:-python}
"$PYTHON" -m ruff check .
"$PYTHON" -m ruff format --check .
"$PYTHON" -m pytest -q "$@"
