"""What every integration module shares.

* This folder on ``sys.path``: the modules (and the stand-alone scripts beside
  them) import ``comfy_harness``, ``example_graphs`` and ``webui_harness`` by name.
* The ``comfyui`` marker (``pytestmark = pytest.mark.comfyui``): the module needs a
  real ComfyUI at ``COMFYUI_PATH``; its tests count as ``integration`` and skip
  with the reason when none is laid out, so CI stays green without one.
* ``comfy_server``: one ComfyUI server for the whole session (a start costs 45–55 s
  on this CPU), with the random SD1.5 checkpoint as ``example_graphs.CHECKPOINT``
  and the test-only nodes of comfy_test_nodes.py. Modules add their LoRAs to it
  and read its log from where their test began (other modules log to it too).
"""
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import comfy_harness as ch  # noqa: E402
import example_graphs as eg  # noqa: E402


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


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    t0 = time.monotonic()
    ckpt = ch.build_checkpoint()
    base = tmp_path_factory.mktemp("comfy")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "grassmann_test_nodes.py").symlink_to(HERE / "comfy_test_nodes.py")
    # one intra-op thread: on these small shared CPUs it was up to 2× faster per UNet call
    with ch.ComfyServer(env={"OMP_NUM_THREADS": "1"}, base_dir=str(base)) as srv:
        srv.add_checkpoint(ckpt, eg.CHECKPOINT)
        print(f"\n[comfy] checkpoint and server {srv.url} up in {time.monotonic() - t0:.1f}s "
              f"(server start {srv.startup_seconds:.1f}s), base {srv.base}")
        yield srv
