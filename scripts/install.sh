#!/usr/bin/env bash
# Installs moe_dist and what it needs into the current Python; safe to run again.
# torch comes first and pinned, because an unpinned torch resolves to a multi-GB CUDA build: on a CPU machine
# we take torch==2.13.0 (the CPU build this project's machines carry locally); on a GPU machine install the
# CUDA torch you want *before* running this script and it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -m pip install -q torch==2.13.0
fi
"$PYTHON" -m pip install -q --disable-pip-version-check -e ".[${MOE_DIST_EXTRAS:-dev,deepspeed}]"
