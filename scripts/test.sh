#!/usr/bin/env bash
# Sets up ./.venv and runs the whole test suite (ComfyUI integration tests run
# when COMFYUI_PATH, default ~/ComfyUI, holds a ComfyUI with its venv; else skip).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_venv.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
