"""The extension inside a real A1111 1.10, a real Forge and a real Forge Neo (opt-in with
``GRASSMANN_WEBUI_TESTS=1``, and skipped unless laid out: ``WEBUI_PATH`` /
``WEBUI_FORGE_PATH`` / ``WEBUI_NEO_PATH``, see webui_harness.py and
../shared/docs/webui.md). One server start per WebUI; 64×64 images, 2 steps.

Every route answers; a merge of two real SD1.5 LoRAs through /merge lands in the
LoRA folder, ``<lora:name:1>`` matches every module of the file (A1111 drops
unmappable keys silently: /applied counts what it matched) and the merge changes
the image (at strength W, see below); overwriting that name shows the new weights at once (the WebUIs' caches are
cleared); a diffusers-format file converted through /convert is fully matched;
/compare renders the grid; the tab renders in headless Chromium.

A1111 renders a 64×64 image in 20–80 s here, so on A1111 only the merge is rendered
(base and merge, every module matched); the overwrite, the converted file and
/compare run on it with ``WEBUI_FULL=1``. Forge and Neo (5–20 s an image) always run them.
"""
from __future__ import annotations

import base64
import io
import os
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest

import webui_harness as wh  # this folder is on sys.path (conftest.py)

pytestmark = pytest.mark.integration
PROMPT = "a photo of a cat"
# Strength: <lora:name:1> is what users type and what /merge answers, and at 1 every module of
# the merge is matched (checked below), but on the random-weight checkpoint its effect on the
# 8-bit image is nil: the random UNet's output conv and residual branches are scaled by 0.1
# (make_sd15_checkpoint.py; the real model zero-inits them), so a real LoRA moves the noise
# prediction by ~1e-5 of itself and 2 steps from noise keep the image (std 43 grey levels)
# within rounding. Measured here (A1111 and Forge, 64x64): at strength 1 the karcher merge
# changes 0 of 4096 pixels; at 12 it changes 4-5 pixels by one level, the overwritten merge
# differs from the first in ~220 pixels, the converted cat LoRA from the base in ~190. So
# images are compared at W; renders are deterministic on the CPU (the same prompt gives the
# same pixels), so any difference is the LoRA's. The test prints each measurement.
W = 12
SOURCES = {"cat": "catundchat__pytorch_lora_weights.safetensors",         # diffusers processor names, 128 UNet
           "analog": "cloneofsimo__analog_svd_rank4_sd15.safetensors",    # cloneofsimo, 144 UNet + 48 TE
           "disney": "cloneofsimo__lora_disney_sd15.safetensors"}
PLAYWRIGHT = Path(os.environ.get("PLAYWRIGHT_CORE_DIR", Path.home() / ".cache" / "grassmann_lora" / "browser"))
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module", params=list(wh.KINDS))
def webui(request, real_loras_dir):
    ok, why = wh.available(request.param)
    if not ok:
        pytest.skip(why)
    ui = wh.WebUI(request.param, {name: real_loras_dir / f for name, f in SOURCES.items()})
    try:
        ui.start()
        print(f"[{ui.kind}] started in {ui.startup_seconds:.0f} s")
        yield ui
    finally:
        ui.stop()


@pytest.fixture(scope="module")
def state(webui):
    return {"base": webui.txt2img(PROMPT)}


def full(webui) -> bool:
    return webui.kind != "a1111" or os.environ.get("WEBUI_FULL") == "1"


def applied(webui, name: str) -> dict:
    entries = {a["name"]: a for a in webui.get("/grassmann-lora/v1/applied")["applied"]}
    assert name in entries, entries
    return entries[name]


def changed(a, b) -> str:
    d = np.abs(a.astype(int) - b.astype(int))
    return (f"mean |diff| {d.mean():.4f} grey levels, max {d.max()}, "
            f"{int((d > 0).any(-1).sum())} of {d.shape[0] * d.shape[1]} pixels (base std {b.std():.1f})")


def assert_fully_matched(webui, name: str, modules: int) -> None:
    entry = applied(webui, name)
    assert entry["file_modules"] == modules and entry["matched_modules"] == modules, entry
    assert "didn't match keys" not in webui.log()


def test_every_route_answers(webui):
    names = {x["name"] for x in webui.get("/grassmann-lora/v1/loras")["loras"]}
    assert set(SOURCES) <= names
    sim = webui.post("/grassmann-lora/v1/similarity", {"a": "cat", "b": "analog"})
    assert sim["report"]["summary"]["shared"] == 128 and "φ" in sim["summary"]
    km = webui.post("/grassmann-lora/v1/kernel", {"loras": ["cat", "analog", "disney"], "no_cluster": True})
    assert len(km["result"]["matrix"]) == 3
    assert webui.get("/grassmann-lora/v1/applied")["applied"] == []
    with pytest.raises(wh.HTTPError) as err:
        webui.post("/grassmann-lora/v1/merge", {"loras": ["cat", "no_such_lora"]})
    assert err.value.status == 404 and "no_such_lora" in err.value.body["error"]
    with pytest.raises(wh.HTTPError) as err:
        webui.post("/grassmann-lora/v1/convert", {"lora": "/etc/passwd"})
    assert err.value.status == 403


def test_merge_lands_and_applies_fully(webui, state):
    answer = webui.post("/grassmann-lora/v1/merge", {"loras": ["cat", "analog"], "method": "karcher",
                                                     "max_iter": 5})
    name, modules = answer["name"], answer["report"]["summary"]["modules"]
    path = webui.lora_dir / answer["file"]
    assert path.is_file() and stat.S_IMODE(path.stat().st_mode) == 0o644
    assert modules == 192 and answer["prompt"] == f"<lora:{name}:1>"
    assert name in {x["name"] for x in webui.get("/grassmann-lora/v1/loras")["loras"]}
    at_one = webui.txt2img(f"{PROMPT} {answer['prompt']}")
    print(f"[{webui.kind}] {answer['prompt']} vs base: {changed(at_one, state['base'])}")
    assert_fully_matched(webui, name, modules)
    image = webui.txt2img(f"{PROMPT} <lora:{name}:{W}>")
    print(f"[{webui.kind}] <lora:merge:{W}> vs base: {changed(image, state['base'])}")
    assert not np.array_equal(image, state["base"]), "the merge did not change the image"
    assert_fully_matched(webui, name, modules)
    state.update(name=name, merged=image, modules=modules)


def test_overwrite_shows_the_new_weights(webui, state):
    if not full(webui):
        pytest.skip(f"{webui.kind} renders slowly here; set WEBUI_FULL=1 (the unit tests check its caches)")
    name = state["name"]
    second = {"loras": ["cat", "analog"], "method": "svd", "weights": [1.0, -0.5]}
    with pytest.raises(wh.HTTPError) as err:
        webui.post("/grassmann-lora/v1/merge", {**second, "name": name})
    assert err.value.status == 409
    answer = webui.post("/grassmann-lora/v1/merge", {**second, "name": name, "overwrite": True})
    assert answer["overwritten"] and answer["name"] == name and answer["caches_cleared"]
    image = webui.txt2img(f"{PROMPT} <lora:{name}:{W}>")
    print(f"[{webui.kind}] overwritten vs first merge at {W}: {changed(image, state['merged'])}")
    assert not np.array_equal(image, state["merged"]), "stale LoRA weights after overwrite"
    assert_fully_matched(webui, name, answer["report"]["summary"]["modules"])
    if full(webui):      # exactly the new weights: the same merge under a name never seen before
        fresh = webui.post("/grassmann-lora/v1/merge", {**second, "name": f"{name}-fresh"})
        assert np.array_equal(webui.txt2img(f"{PROMPT} <lora:{fresh['name']}:{W}>"), image)


def test_diffusers_file_converted_then_fully_matched(webui, state):
    if not full(webui):
        pytest.skip(f"{webui.kind} renders slowly here; set WEBUI_FULL=1")
    answer = webui.post("/grassmann-lora/v1/convert", {"lora": "cat"})
    assert answer["name"] == "cat-kohya" and answer["modules"] == 128
    image = webui.txt2img(f"{PROMPT} <lora:cat-kohya:{W}>")
    print(f"[{webui.kind}] cat-kohya at {W} vs base: {changed(image, state['base'])}")
    assert not np.array_equal(image, state["base"])
    assert_fully_matched(webui, "cat-kohya", 128)


def test_compare_route_renders_the_grid(webui, state):
    if not full(webui):
        pytest.skip(f"{webui.kind} renders slowly here; set WEBUI_FULL=1 to run /compare on it")
    from PIL import Image

    answer = webui.post("/grassmann-lora/v1/compare", {"loras": ["cat-kohya"], "prompt": PROMPT, "seed": 1234,
                                                       "steps": 2, "width": 64, "height": 64,
                                                       "sampler_name": "Euler", "cfg_scale": 7, "weight": W})
    assert answer["labels"] == ["base", "cat-kohya"] and answer["mad"][0] == 0 and answer["mad"][1] > 0
    grid = Image.open(io.BytesIO(base64.b64decode(answer["grid_png"])))
    assert grid.size[0] > 2 * 64


def test_tab_renders_in_headless_chromium(webui, tmp_path):
    node = shutil.which("node")
    if not (node and os.path.exists(CHROMIUM) and (PLAYWRIGHT / "node_modules" / "playwright-core").is_dir()):
        pytest.skip(f"needs node, {CHROMIUM} and playwright-core under {PLAYWRIGHT} "
                    "(apt-get install chromium; npm install --prefix <dir> playwright-core)")
    out = Path(os.environ.get("GRASSMANN_SCREENSHOT_DIR", tmp_path))
    shot = out / f"webui_tab_{webui.kind}.png"
    script = Path(__file__).with_name("webui_tab.mjs")
    run = subprocess.run([node, str(script), webui.url, str(shot), "cat", "analog"], capture_output=True, text=True,
                         timeout=480,
                         env=dict(os.environ, PLAYWRIGHT_CORE_DIR=str(PLAYWRIGHT), CHROMIUM=CHROMIUM))
    print(run.stdout[-3000:], run.stderr[-3000:])
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    # the error shows the name as typed (the Markdown status line once ate its * and <d>)
    status = next((line for line in run.stdout.splitlines() if line.startswith("status: ")), "")
    assert "a/b*c<d>" in status and "not a plain file name" in status, run.stdout[-2000:]
    from PIL import Image
    img = np.asarray(Image.open(shot).convert("L"))
    assert img.shape[0] > 300 and img.std() > 5          # not blank
