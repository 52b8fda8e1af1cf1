#!/usr/bin/env bash
# The WebUIs' pinned libraries (A1111 1.10 / Forge: Pillow 9.5.0, numpy 1.26.2,
# safetensors 0.4.2, torch 2.12.x; Python 3.10 where present) in a venv of their
# own, and the tests that exercise the code the WebUI extension runs. Called by
# .ci/run after the main suite. The venv lives outside the checkout (a few GB:
# PyPI's torch 2.12 is the CUDA build) and is reused while its pins are unchanged.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GRASSMANN_PINNED_VENV:-$HOME/.cache/grassmann_lora/venv-pinned}"
PINS=(torch==2.12.1 numpy==1.26.2 Pillow==9.5.0 safetensors==0.4.2 "scipy>=1.10,<1.14" "pytest>=7")
PY="${PINNED_PYTHON:-}"
if [ -z "$PY" ]; then
  # the first that runs (a pyenv shim can exist and still refuse to run)
  for c in /root/.pyenv/versions/3.10.13/bin/python python3.10 python3.11 python3; do
    if "$c" --version >/dev/null 2>&1; then PY="$c"; break; fi
  done
fi
WANT="$("$PY" --version 2>&1) ${PINS[*]}"
if [ "$(cat "$VENV/.pins" 2>/dev/null)" != "$WANT" ]; then
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PINS[@]}"
  echo "$WANT" > "$VENV/.pins"
fi
"$VENV/bin/python" - <<'PY'
import sys, numpy, PIL, safetensors, torch
print(f"pinned leg: Python {sys.version.split()[0]}, torch {torch.__version__}, numpy {numpy.__version__}, "
      f"Pillow {PIL.__version__}, safetensors {safetensors.__version__}")
assert (numpy.__version__, PIL.__version__, safetensors.__version__) == ("1.26.2", "9.5.0", "0.4.2")
assert torch.__version__.startswith("2.12.")
PY
cd "$ROOT"
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@" \
  tests/test_webui_unit.py tests/test_convert.py tests/test_plot.py tests/test_formats.py \
  "tests/test_nodes_unit.py::test_compare_grid_geometry_and_tiles"
