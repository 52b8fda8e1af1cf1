"""The pack's nodes inside a real ComfyUI, driven through its HTTP API.

Needs ComfyUI laid out at ``COMFYUI_PATH`` (default ``~/ComfyUI``) with its own
``venv/`` (see README); skipped otherwise. One headless server (``--cpu``,
loopback, free port; conftest.py's ``comfy_server``) serves the session, with a random-weight checkpoint
of the full SD1.5 architecture and the real SD1.5 LoRAs from
``../shared/fixtures/real_loras`` (cloneofsimo ones converted to kohya).
Sampling is kept tiny (64×64 pixels, 1 step) because every UNet call on this
CPU costs seconds whatever the image size. Wall times of each step are
printed (run with ``-s`` to see them).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import comfy_harness as ch  # this folder is on sys.path (conftest.py)
import example_graphs as eg

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

PACK_NODES = ["GrassmannLoRALoad", "GrassmannLoRASimilarity", "GrassmannLoRAKernelMatrix",
              "GrassmannLoRAKarcherMerge", "GrassmannLoRAApply", "GrassmannLoRASave",
              "GrassmannLoRACompareGrid", "GrassmannLoRAMergeFidelity"]
SIZE, STEPS, CFG = 64, 1, 1.0          # cfg 1: ComfyUI skips the negative pass
# The random UNet barely reacts to a real LoRA (its output moves by ~1e-5 of
# itself at strength 1: one or two 8-bit pixels of 4096 change). The side-by-side
# test applies every source and merge at this model strength, the same for all
# five and for the stock-loader check, so that their images differ visibly.
STRENGTH_MODEL = 100.0
BAD_FILE = "not_a_lora.safetensors"
SD2_FILE = "cloneofsimo__lora_illust_sd2.pt"
SD2_OTHER = "cloneofsimo__lora_pop_sd2.pt"
TIMES: dict[str, float] = {}


def pack(name: str):
    """A module of the pack imported as ComfyUI imports it (a package), so the
    test compares against the very classes and core functions ComfyUI runs."""
    root = eg.REPO
    if "grassmann_lora" not in sys.modules:
        spec = importlib.util.spec_from_file_location("grassmann_lora", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["grassmann_lora"] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"grassmann_lora.{name}")


def timed(label: str, fn, *args, **kwargs):
    t0 = time.monotonic()
    out = fn(*args, **kwargs)
    TIMES[label] = time.monotonic() - t0
    print(f"\n[comfy] {label}: {TIMES[label]:.1f}s")
    return out


@pytest.fixture(scope="module")
def comfy(comfy_server, real_loras_dir):
    # the session's server (conftest.py), with the test-only nodes of comfy_test_nodes.py
    t0 = time.monotonic()
    srv = comfy_server
    TIMES["server start"] = srv.startup_seconds
    timed("prepare LoRAs", eg.prepare_loras, srv.loras_dir, real_loras_dir)
    srv.add_lora(real_loras_dir / SD2_FILE)
    srv.add_lora(real_loras_dir / SD2_OTHER)
    from safetensors.numpy import save_file
    save_file({"model.diffusion_model.input_blocks.0.0.weight": np.ones((4, 4), np.float32)},
              str(srv.loras_dir / BAD_FILE))
    yield srv
    TIMES["module total"] = time.monotonic() - t0
    print("\n[comfy] timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in TIMES.items()))


def run(srv, graph: dict, label: str, timeout: float = 600) -> dict:
    return timed(label, srv.run, graph, timeout=timeout)


def ui(entry: dict, node_id: str) -> dict:
    return (entry.get("outputs") or {}).get(str(node_id), {})


def answers(srv) -> bool:
    return "GrassmannLoRALoad" in srv.object_info("GrassmannLoRALoad")


# ----------------------------------------------------------------------------- /object_info

def test_object_info_declares_every_node(comfy):
    info = comfy.object_info()
    assert comfy.pack_import_status() == "imported", comfy.log_tail()
    mappings = pack("nodes").NODE_CLASS_MAPPINGS
    names = pack("nodes").NODE_DISPLAY_NAME_MAPPINGS
    assert sorted(mappings) == sorted(PACK_NODES)
    for node_id in PACK_NODES:
        assert node_id in info, f"{node_id} missing from /object_info"
        got, cls = info[node_id], mappings[node_id]
        assert got["python_module"].startswith("custom_nodes.grassmann_lora"), got["python_module"]
        assert got["display_name"] == names[node_id]
        assert got["category"] == "Grassmann LoRA"
        assert got["output"] == list(cls.RETURN_TYPES)
        assert got["output_name"] == list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES))
        declared = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            assert list(got["input"].get(section, {})) == list(declared.get(section, {})), (node_id, section)
            for name, spec in got["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    # the Load node's dropdown is ComfyUI's loras list, with our test files in it
    loras = info["GrassmannLoRALoad"]["input"]["required"]["lora_name"][0]
    assert set(eg.LORAS) <= set(loras) and BAD_FILE in loras
    assert info["GrassmannLoRASave"]["output_node"] is True


# ----------------------------------------------------------------------------- UI files

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def ui_to_api(ui_graph: dict, info: dict) -> dict:
    """UI-format workflow → API prompt, the way the front end maps it: links by
    input name, widget values in the order of the node's widget inputs (plus the
    control_after_generate value that follows a seed)."""
    links = {l[0]: l for l in ui_graph["links"]}
    out = {}
    for node in ui_graph["nodes"]:
        if node.get("mode", 0) in (2, 4) or node["type"] not in info:
            continue
        spec = info[node["type"]]
        inputs = {}
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                link = links[inp["link"]]
                inputs[inp["name"]] = [str(link[1]), link[2]]
        values = list(node.get("widgets_values") or [])
        order = spec.get("input_order", {})
        for name in order.get("required", []) + order.get("optional", []):
            section = "required" if name in spec["input"].get("required", {}) else "optional"
            kind, opts = spec["input"][section][name][0], (spec["input"][section][name] + [{}])[1]
            if not (isinstance(kind, list) or kind in WIDGET_TYPES) or opts.get("forceInput"):
                continue
            if not values:
                break
            value = values.pop(0)
            # the front end adds a "control after generate" value after such widgets
            # (by default after every INT named seed / noise_seed)
            if opts.get("control_after_generate", kind == "INT" and name in ("seed", "noise_seed")):
                values.pop(0)
            inputs.setdefault(name, value)
        out[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return out


@pytest.mark.parametrize("name", list(eg.WORKFLOWS))
def test_ui_workflow_is_the_api_graph(comfy, name):
    path = eg.WORKFLOWS_DIR / f"{name}.json"
    api = json.loads(eg.api_path(name).read_text())
    assert api == json.loads(json.dumps(eg.WORKFLOWS[name]())), "api twin is stale: rerun example_graphs.py"
    ui_graph = json.loads(path.read_text())
    assert ui_graph.get("nodes") and "links" in ui_graph, "not a UI-format workflow"
    got = ui_to_api(ui_graph, comfy.object_info())
    want = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    assert got == want


# ----------------------------------------------------------------------------- workflow 3

def test_two_lora_analysis(comfy, real_loras_dir):
    graph = eg.runnable(eg.TWO_LORA)
    entry = run(comfy, graph, "workflow 3 (two-LoRA analysis)")
    out = ui(entry, "3")
    tables = out["grassmann_table"]
    previews = comfy.output_images(entry, "3")
    assert len(previews) == 2 and all(p.is_file() for p in previews)
    # the numbers on the node are core's numbers for the same two files
    compare = pack("core.similarity").compare
    load_lora = pack("core.formats").load_lora
    lora_a = load_lora(str(comfy.loras_dir / eg.LORA_A))
    lora_b = load_lora(str(comfy.loras_dir / eg.LORA_B))
    report = compare(lora_a, lora_b, side="both")
    agg = report.summary()["sides"]
    assert [r[0] for r in tables[0]["rows"]] == ["out", "in"]
    for row, side in zip(tables[0]["rows"], ("out", "in")):
        assert row[2] == f"{agg[side]['phi_mean']:.4f}" and row[5] == f"{agg[side]['chance_mean']:.4f}"
    assert out["text"] == [report.text_summary()]
    # the saved heatmap is core's image (to within the 8-bit rounding of ComfyUI's SaveImage)
    saved = comfy.output_images(entry, "4", load=True)[0]
    want = np.asarray(report.heatmap_image(), dtype=np.float32) / 255.0
    assert saved.shape == want.shape and np.abs(saved - want).max() <= 1.5 / 255


# ----------------------------------------------------------------------------- workflow 2

def test_library_map(comfy):
    graph = eg.runnable(eg.LIBRARY_MAP)
    entry = run(comfy, graph, "workflow 2 (library map, 6 LoRAs)")
    out = ui(entry, "20")
    loras_table, matrix = out["grassmann_table"][0], out["grassmann_table"][1]
    assert sorted(r[1] for r in loras_table["rows"]) == sorted(eg.LIBRARY)
    assert all(r[2].startswith("c") for r in loras_table["rows"])
    # rows and columns named by input; the slot of each file is the one it is connected to
    slot_of = {name: f"lora_{k}" for k, name in enumerate(eg.LIBRARY, 1)}
    assert all(r[0] == slot_of[r[1]] for r in loras_table["rows"])
    assert [r[0] for r in matrix["rows"]] == matrix["columns"][1:] == [r[0] for r in loras_table["rows"]]
    # the text-encoder-only LoRA shares no module with the UNet-only one: said per pair, not a 0
    te, unet = slot_of["cloneofsimo__lora_kiriko2_sd15_te_kohya.safetensors"], \
        slot_of["catundchat__pytorch_lora_weights.safetensors"]
    row = next(r for r in matrix["rows"] if r[0] == te)
    assert row[1 + matrix["columns"][1:].index(unet)] == "none shared"
    warnings = next(t for t in out["grassmann_table"] if t["title"] == "Warnings")["lines"]
    assert any("share no module" in w and "kiriko2" in w and "catundchat" in w for w in warnings)
    cells = np.array([[np.nan if c == "none shared" else float(c) for c in row[1:]] for row in matrix["rows"]])
    assert cells.shape == (6, 6) and np.allclose(np.diag(cells), 1.0)
    assert np.allclose(cells, cells.T, equal_nan=True)
    assert len(comfy.output_images(entry, "21")) == 1


def test_cancel_stops_kernel_matrix(comfy):
    """Interrupting while the kernel matrix runs ends the prompt as interrupted
    (ComfyUI's progress bar updates raise), long before the work would finish."""
    graph = eg.runnable(eg.LIBRARY_MAP)
    graph["20"]["inputs"].update(top=0, side="both")          # new inputs: nothing cached
    pid = comfy.queue_prompt(graph)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not comfy._request("GET", "/queue").get("queue_running"):
        time.sleep(0.2)
    time.sleep(2.0)                                           # the loaders are cached: now in the matrix
    t0 = time.monotonic()
    comfy.interrupt()
    with pytest.raises(ch.ComfyError, match="interrupted at node 20"):   # inside the kernel node
        comfy.wait_for(pid, timeout=120)
    TIMES["cancel → stopped"] = time.monotonic() - t0
    print(f"\n[comfy] interrupted after {TIMES['cancel → stopped']:.1f}s")
    assert TIMES["cancel → stopped"] < 30
    assert answers(comfy)


# ----------------------------------------------------------------------------- workflow 1

def _side_by_side_graph() -> dict:
    """Workflow 1 at test size, plus each branch's image saved and its weights digested."""
    g = eg.runnable(eg.SIDE_BY_SIDE)
    g["10"]["inputs"].update(width=SIZE, height=SIZE)
    for k, (_, src) in enumerate(eg.SIDE_BY_SIDE_SOURCES):
        g[src]["inputs"]["strength_model"] = STRENGTH_MODEL
        g[str(22 + 10 * k)]["inputs"].update(steps=STEPS, cfg=CFG)
        g[f"9{k}"] = {"class_type": "SaveImage", "inputs": {"images": [str(23 + 10 * k), 0],
                                                            "filename_prefix": f"source_{k}"}}
        g[f"10{k}"] = {"class_type": "GrassmannTestWeightDigest", "inputs": {"model": [src, 0],
                                                                             "clip": [src, 1]}}
    # the checkpoint's own MODEL/CLIP, used by all five patching nodes, must stay unpatched
    g["110"] = {"class_type": "GrassmannTestWeightDigest", "inputs": {"model": ["1", 0], "clip": ["1", 1]}}
    return g


@pytest.fixture(scope="module")
def side_by_side(comfy):
    log_before = len(comfy.log_text())
    entry = run(comfy, _side_by_side_graph(), "workflow 1 (side by side, 5 samplers)")
    log = comfy.log_text()[log_before:]
    n = len(eg.SIDE_BY_SIDE_SOURCES)
    images = [comfy.output_images(entry, f"9{k}", load=True)[0] for k in range(n)]
    digests = [ui(entry, f"10{k}")["digest"][0] for k in range(n)]
    base = ui(entry, "110")["digest"][0]
    assert base["model"].startswith("0 patched") and base["clip"].startswith("0 patched"), base
    return entry, log, images, digests


def test_side_by_side_runs_clean(comfy, side_by_side):
    entry, log, images, digests = side_by_side
    assert "lora key not loaded" not in log and "NOT LOADED" not in log, log[-3000:]
    assert all(img.shape == (SIZE, SIZE, 3) for img in images)
    # every source and merge runs with its own weights and gives its own image
    labels = [label for label, _ in eg.SIDE_BY_SIDE_SOURCES]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert digests[i]["model"] != digests[j]["model"], f"{labels[i]} and {labels[j]}: same UNet weights"
            assert not np.array_equal(images[i], images[j]), f"{labels[i]} and {labels[j]}: same image"
    changed = {f"{labels[i]} vs {labels[j]}": int((images[i] != images[j]).any(axis=-1).sum())
               for i in range(len(images)) for j in range(i + 1, len(images))}
    print(f"\n[comfy] pixels (of {SIZE * SIZE}) that differ between branches: "
          + ", ".join(f"{k} {v}" for k, v in changed.items()))
    # every module of every source was patched: A is UNet-only (128), B has 144 UNet + 48 TE
    count = [{p: int(d[p].split()[0]) for p in d} for d in digests]
    assert count[0] == {"model": 128, "clip": 0} and count[1] == {"model": 144, "clip": 48}
    assert all(c == {"model": 144, "clip": 48} for c in count[2:])
    # the merge nodes reported on themselves
    for node_id in ("6", "7", "8"):
        tables = ui(entry, node_id)["grassmann_table"]
        stems = [r[1] for r in tables[0]["rows"]]
        assert stems == [Path(eg.LORA_A).stem, Path(eg.LORA_B).stem]
    # linear is exact: its relative error is rounding only
    facts = dict(ui(entry, "7")["grassmann_table"][1]["rows"])
    assert float(facts["relative error"]) < 1e-6


def test_compare_grid_size_and_tiles(comfy, side_by_side):
    entry, _, images, _ = side_by_side
    grid = comfy.output_images(entry, "81", load=True)[0]
    cg = pack("core.compare_grid")
    geo = cg.grid_geometry(len(images), SIZE, SIZE)
    assert grid.shape == (geo.height, geo.width, 3)
    for k, img in enumerate(images):
        x, y = geo.tile_origin(k)
        tile = grid[y:y + geo.tile_h:geo.scale, x:x + geo.tile_w:geo.scale]
        assert np.abs(tile - img).max() <= 1.5 / 255, k
    rows = ui(entry, "80")["grassmann_table"][0]["rows"]
    assert [r[0] for r in rows][1:] == [label for label, _ in eg.SIDE_BY_SIDE_SOURCES][1:]
    assert float(rows[0][1]) == 0.0 and float(rows[0][2]) == pytest.approx(1.0)


def test_workflow_1_runs_again(comfy, side_by_side):
    """Issue 14: queueing the template again must succeed. The merge weights change
    so the merge and its Save node really run again (unchanged nodes come from
    ComfyUI's cache); the second save gets a new numbered name and the first file
    stays as it was. Queued right after workflow 1's first run (the user's re-queue):
    ComfyUI keeps the outputs of the previous prompt only."""
    entry, _, _, _ = side_by_side
    first = ui(entry, "9")["grassmann_table"][0]["rows"][0][1]
    before = (comfy.loras_dir / first).read_bytes()
    graph = _side_by_side_graph()
    graph["6"]["inputs"]["weights"] = "0.6, 0.4"
    again = run(comfy, graph, "workflow 1 queued again (merge weights changed)")
    second = ui(again, "9")["grassmann_table"][0]["rows"][0][1]
    assert second != first and (comfy.loras_dir / second).is_file()
    assert (comfy.loras_dir / first).read_bytes() == before
    assert len(comfy.output_images(again, "81")) == 1          # the grid was made again


def test_saved_merge_loads_in_stock_loraloader_identically(comfy, side_by_side):
    entry, _, images, digests = side_by_side
    name = ui(entry, "9")["grassmann_table"][0]["rows"][0][1]
    stem = eg.SAVED_MERGE.removesuffix(".safetensors")
    assert re.fullmatch(re.escape(stem) + r"_\d{5}\.safetensors", name)   # numbered, as SaveImage does
    saved = comfy.loras_dir / name
    assert saved.is_file()
    # listed by the stock loader without a restart
    listed = comfy.object_info("LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"][0]
    assert name in listed
    from safetensors import safe_open
    with safe_open(str(saved), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert json.loads(meta["grassmann_lora.merge"])["method"] == "karcher"
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)

    api = eg.runnable(eg.SIDE_BY_SIDE)
    sampler = api["42"]["inputs"]
    graph = ch.txt2img_graph(eg.CHECKPOINT, name, strength_model=STRENGTH_MODEL, strength_clip=1.0,
                             positive=eg.POSITIVE, negative=eg.NEGATIVE, width=SIZE, height=SIZE,
                             steps=STEPS, cfg=CFG, seed=sampler["seed"],
                             sampler=sampler["sampler_name"], scheduler=sampler["scheduler"],
                             filename_prefix="stock_loraloader")
    graph["9"] = {"class_type": "GrassmannTestWeightDigest", "inputs": {"model": ["2", 0], "clip": ["2", 1]}}
    log_before = len(comfy.log_text())
    out = run(comfy, graph, "stock LoraLoader with the saved merge")
    assert "lora key not loaded" not in comfy.log_text()[log_before:]
    k = [label for label, _ in eg.SIDE_BY_SIDE_SOURCES].index("Karcher merge")
    # bit for bit the same patched weights (UNet and text encoder) …
    assert ui(out, "9")["digest"][0] == digests[k]
    # … hence the same image
    stock = comfy.output_images(out, "8", load=True)[0]
    assert np.array_equal(stock, images[k]), f"max difference {np.abs(stock - images[k]).max()}"


# ----------------------------------------------------------------------------- workflow 4

def test_merge_fidelity_workflow(comfy):
    """Workflow 4 at test size: three merges rendered into one grid, and the
    fidelity table of both sources against all three merges plus a ties merge in
    the node's fourth merge slot. The node's JSON (through the test-only show
    node): the weights the merges recorded, every F and cos defined, printed beside
    each merge's weight-space error (a measurement on a random-weight model: no
    order asserted)."""
    g = eg.runnable(eg.MERGE_FIDELITY)
    g["10"]["inputs"].update(width=SIZE, height=SIZE)
    for k in range(len(eg.MERGE_FIDELITY_MERGES)):
        g[str(22 + 10 * k)]["inputs"].update(steps=STEPS, cfg=CFG)
    merge_nodes = {method: node for _, node, method in eg.MERGE_FIDELITY_MERGES} | {"ties": "7"}
    g["7"] = {"class_type": g["6"]["class_type"], "inputs": dict(g["6"]["inputs"], method="ties")}
    g["90"]["inputs"].update(width=SIZE, height=SIZE, seeds=1, timesteps=1, merged_4=["7", 2])
    g["91"] = {"class_type": "GrassmannTestShowString", "inputs": {"text": ["90", 1]}}
    log_before = len(comfy.log_text())
    entry = run(comfy, g, "workflow 4 (three merges + fidelity, a ties merge in merged_4)")
    assert "lora key not loaded" not in comfy.log_text()[log_before:]
    fidelity = ui(entry, "90")["grassmann_table"][0]
    assert [r[0] for r in fidelity["rows"]] == [Path(eg.LORA_A).stem, Path(eg.LORA_B).stem]
    assert fidelity["columns"][3:] == [f"merged-{m}: F / cos" for m in merge_nodes]
    assert all(len(c.split(" / ")) == 2 for r in fidelity["rows"] for c in r[3:]), fidelity["rows"]
    assert "12 denoiser evaluations" in fidelity["note"]
    r = json.loads(ui(entry, "91")["string"][0])
    errors = {m: dict(ui(entry, node)["grassmann_table"][1]["rows"])["relative error"]
              for m, node in merge_nodes.items()}
    print("\n[comfy] method   weight-space rel. error   F_A      F_B      cos_A    cos_B")
    for j, m in enumerate(merge_nodes):
        print(f"[comfy] {m:8s} {errors[m]:>24s}   {r['F'][0][j]:.4f}   {r['F'][1][j]:.4f}   "
              f"{r['cos'][0][j]:.4f}   {r['cos'][1][j]:.4f}")
    assert r["weights"] == [0.5, 0.5]                          # read from the merges' recipes
    assert r["merges"] == [f"merged-{m}" for m in merge_nodes]
    assert all(f is not None and np.isfinite(f) for row in r["F"] for f in row)
    assert all(c is not None and -1 <= c <= 1 for row in r["cos"] for c in row)
    assert float(errors["linear"]) < 1e-3
    assert len(comfy.output_images(entry, "90")) == 1                      # the heatmap preview
    grid = comfy.output_images(entry, "81", load=True)[0]
    geo = pack("core.compare_grid").grid_geometry(len(eg.MERGE_FIDELITY_MERGES), SIZE, SIZE)
    assert grid.shape == (geo.height, geo.width, 3)


# ----------------------------------------------------------------------------- bad inputs

def _error(comfy, graph: dict, label: str) -> ch.ComfyExecutionError:
    with pytest.raises(ch.ComfyExecutionError) as info:
        run(comfy, graph, label)
    assert answers(comfy), "server stopped answering after an error"
    return info.value


def _load(name: str, node_id: str = "1") -> dict:
    return {node_id: {"class_type": "GrassmannLoRALoad", "inputs": {"lora_name": name}}}


def _similarity(a: str, b: str) -> dict:
    g = {**_load(a, "1"), **_load(b, "2")}
    g["3"] = {"class_type": "GrassmannLoRASimilarity",
              "inputs": {"lora_a": ["1", 0], "lora_b": ["2", 0], "side": "out", "top": 0, "module": ""}}
    return g


def test_every_merge_method_maps_in_stock_loraloader(comfy):
    """Issue 5: for the real SD1.5 files every method writes a file whose every
    module ComfyUI's stock LoraLoader maps and patches."""
    import torch
    formats, merging = pack("core.formats"), pack("core.merge")
    sources = [formats.load_lora(str(comfy.loras_dir / name)) for name in (eg.LORA_A, eg.LORA_B)]
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": eg.CHECKPOINT}}}
    expected = {}
    for k, method in enumerate(merging.METHODS):
        name = f"every_method_{method}.safetensors"
        result = merging.merge(sources, [0.5, 0.5], method=method)
        result.save(str(comfy.loras_dir / name), dtype=torch.float16)
        loader, counter = str(100 + 2 * k), str(101 + 2 * k)
        graph[loader] = {"class_type": "LoraLoader", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora_name": name,
            "strength_model": 1.0, "strength_clip": 1.0}}
        graph[counter] = {"class_type": "GrassmannTestPatchCount",
                          "inputs": {"model": [loader, 0], "clip": [loader, 1]}}
        expected[counter] = (method, len(result.lora.modules))
    log_before = len(comfy.log_text())
    entry = run(comfy, graph, "every merge method through stock LoraLoader")
    log = comfy.log_text()[log_before:]
    assert "lora key not loaded" not in log and "NOT LOADED" not in log, log[-3000:]
    for counter, (method, modules) in expected.items():
        patched = ui(entry, counter)["patches"][0]
        assert patched["model"] + patched["clip"] == modules, (method, patched, modules)
        assert patched["clip"] > 0 and patched["model"] > 0, (method, patched)


def test_non_lora_file_is_an_error_naming_it(comfy):
    err = _error(comfy, _similarity(BAD_FILE, eg.LORA_A), "error: not a LoRA")
    assert err.node_type == "GrassmannLoRALoad"
    assert BAD_FILE in err.exception_message and "not a LoRA" in err.exception_message


def test_sd2_with_sd15_is_an_error(comfy):
    err = _error(comfy, _similarity(SD2_FILE, eg.LORA_A), "error: SD2 vs SD1.5 similarity")
    assert err.node_type == "GrassmannLoRASimilarity"
    assert "SD2" in err.exception_message and "SD1" in err.exception_message
    g = {**_load(SD2_FILE, "1"), "2": {"class_type": "CheckpointLoaderSimple",
                                       "inputs": {"ckpt_name": eg.CHECKPOINT}}}
    g["3"] = {"class_type": "GrassmannLoRAApply", "inputs": {
        "model": ["2", 0], "clip": ["2", 1], "lora": ["1", 0], "strength_model": 1.0,
        "strength_clip": 1.0, "dtype": "as stored"}}
    g["4"] = {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}}
    err = _error(comfy, g, "error: SD2 LoRA on an SD1.5 model")
    assert err.node_type == "GrassmannLoRAApply" and SD2_FILE in err.exception_message
    assert "SD2" in err.exception_message
    # two SD2 LoRAs merged onto the SD1.5 checkpoint: the sources and the checkpoint's family
    # are named, not the merge's own name (a file the user never made)
    g = {**_load(SD2_FILE, "1"), **_load(SD2_OTHER, "5"),
         "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": eg.CHECKPOINT}}}
    g["3"] = {"class_type": "GrassmannLoRAKarcherMerge", "inputs": {
        "model": ["2", 0], "clip": ["2", 1], "method": "karcher", "rank": 0, "weights": "", "dtype": "fp16",
        "strength_model": 1.0, "strength_clip": 1.0, "ties_density": 0.2, "dare_drop": 0.5, "dare_seed": 0,
        "lora_1": ["1", 0], "lora_2": ["5", 0]}}
    g["4"] = {"class_type": "PreviewAny", "inputs": {"source": ["3", 3]}}
    err = _error(comfy, g, "error: two SD2 LoRAs merged onto an SD1.5 model")
    msg = err.exception_message
    assert err.node_type == "GrassmannLoRAKarcherMerge", msg
    assert f"lora_1 {SD2_FILE} (SD2.x)" in msg and f"lora_2 {SD2_OTHER} (SD2.x)" in msg, msg
    assert "SD1.x" in msg and "merged" not in msg, msg


def test_save_refuses_escape_and_numbers_reruns(comfy):
    outside = comfy.loras_dir.parent / "escape.safetensors"
    g = {**_load(eg.LORA_A), "2": {"class_type": "GrassmannLoRASave", "inputs": {
        "lora": ["1", 0], "filename": "../escape.safetensors", "dtype": "fp16", "overwrite": True}}}
    err = _error(comfy, g, "error: save outside the loras folder")
    assert "output folder" in err.exception_message and not outside.exists()
    for bad in ("C:\\Windows\\x", "~/x", "sub/", "a\nb"):
        g["2"]["inputs"]["filename"] = bad
        err = _error(comfy, g, f"error: bad name {bad!r}")
        assert "file name" in err.exception_message and "\n" not in err.exception_message.strip()
    g["2"]["inputs"].update(filename="converted_a.safetensors", overwrite=False)
    first = run(comfy, g, "save a LoRA")
    assert ui(first, "2")["grassmann_table"][0]["rows"][0][1] == "converted_a_00001.safetensors"
    before = (comfy.loras_dir / "converted_a_00001.safetensors").read_bytes()
    g["2"]["inputs"]["dtype"] = "fp32"                       # a re-run: the next number, nothing replaced
    second = run(comfy, g, "save again")
    assert ui(second, "2")["grassmann_table"][0]["rows"][0][1] == "converted_a_00002.safetensors"
    assert (comfy.loras_dir / "converted_a_00001.safetensors").read_bytes() == before
    g["2"]["inputs"]["overwrite"] = True                     # asked: exactly the name typed
    third = run(comfy, g, "save with overwrite")
    assert ui(third, "2")["grassmann_table"][0]["rows"][0][1] == "converted_a.safetensors"
    assert not [p for p in comfy.loras_dir.iterdir() if ".partial-" in p.name]
