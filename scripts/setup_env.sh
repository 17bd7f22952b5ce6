#!/usr/bin/env bash
# Create ./.venv (if missing) and install sam3d into it.
#   bash scripts/setup_env.sh          # runtime only
#   bash scripts/setup_env.sh test     # + test extra (pytest, surface-distance, scikit-image, ruff)
# Torch: by default the pinned pair torch==2.14.1 / torchvision==0.29.1 is installed
# (on this project's machines pip takes it from local files). To bring your own CUDA
# build, install torch/torchvision into .venv first and set SAM3D_KEEP_TORCH=1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extra=${1:-}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
pip_() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"; }
if [[ -z ${SAM3D_KEEP_TORCH:-} ]] && ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  echo "[setup] installing torch==2.14.1 torchvision==0.29.1"
  pip_ "torch==2.14.1" "torchvision==0.29.1"
fi
spec="."
[[ $extra == test ]] && spec=".[test]"
echo "[setup] installing sam3d-med ($spec)"
pip_ -e "$spec"
