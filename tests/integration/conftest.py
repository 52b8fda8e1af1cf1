"""What every integration module shares.

* This folder on ``sys.path``: the modules (and the stand-alone scripts beside
  them) import ``comfy_harness``, ``example_graphs`` and ``webui_harness`` by name.
* The ``comfyui`` marker (``pytestmark = pytest.mark.comfyui``): the module needs a
  real ComfyUI at ``COMFYUI_PATH``; its tests count as ``integration`` and skip
  with the reason when none is laid out, so CI stays green without one.
"""
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import comfy_harness as ch  # noqa: E402


@pytest.hookimpl(tryfirst=True)  # before -m selects on the "integration" marker added here
def pytest_collection_modifyitems(config, items):
    marked = [item for item in items if item.get_closest_marker("comfyui")]
    if not marked:
        return
    ok, why = ch.comfyui_available()
    skip = pytest.mark.skip(reason=f"needs a real ComfyUI: {why}")
    for item in marked:
        item.add_marker(pytest.mark.integration)
        if not ok:
            item.add_marker(skip)
