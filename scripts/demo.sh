#!/usr/bin/env bash
# The main job on the embedded default: install, make phantoms, preview them,
# then whatever `sam3d demo` does today (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/sam3d demo --out "${1:-demo_out}"
