#!/usr/bin/env bash
# Sets up ./.venv and runs the main job on built-in example LoRAs; results in ./demo_out.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_venv.sh"
cd "$ROOT"
# --overwrite: demo_out is the demo's own folder, so a second run replaces the first
exec "$ROOT/.venv/bin/python" -m core demo --out "${1:-demo_out}" --overwrite
