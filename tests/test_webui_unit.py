"""The WebUI extension without a WebUI: a fake ``modules`` package (script_callbacks,
shared, processing, call_queue) and a fake Lora extension ``networks`` stand in for
A1111/Forge. Checks that scripts/grassmann_lora_webui.py registers everything and
loads the pack under a private name, the routes' answers and errors, the cache
invalidation of both WebUIs, and the tab's callbacks as plain functions."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import stat
import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "grassmann_lora_webui.py"
PACK = "_grassmann_lora_webui_pack"

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- the fake WebUI

class Entry:
    def __init__(self, name, filename):
        self.name, self.alias, self.filename = name, name, filename


class Callbacks(types.ModuleType):
    def __init__(self):
        super().__init__("modules.script_callbacks")
        self.registered = {}
        for hook in ("on_ui_tabs", "on_app_started", "on_ui_settings", "on_after_component"):
            setattr(self, hook, functools.partial(self._add, hook))

    def _add(self, hook, fn, *, name=None):
        self.registered.setdefault(hook, []).append(fn)


class State:
    interrupted = False
    job_count = job_no = 0

    def begin(self, job=""):
        self.interrupted = False

    def end(self):
        pass

    def interrupt(self):
        self.interrupted = True


class Processing(types.ModuleType):
    """processing.process_images that draws an image depending on the prompt."""

    class StableDiffusionProcessing:
        cached_c = ["prompt", "cond"]
        cached_uc = ["neg", "cond"]

    class StableDiffusionProcessingTxt2Img:
        def __init__(self, **kw):
            self.kw = kw

        def close(self):
            pass

    def __init__(self):
        super().__init__("modules.processing")
        self.prompts = []

    def process_images(self, p):
        self.prompts.append(p.kw["prompt"])
        shade = 40 + 60 * p.kw["prompt"].count("<lora:")
        img = Image.new("RGB", (p.kw["width"], p.kw["height"]), (shade, 100, 150))
        return types.SimpleNamespace(images=[img])


class Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.network_current_names = (("old", 1.0, 1.0, None),)


def fake_networks(lora_dir: Path, forge: bool, neo: bool = False) -> types.ModuleType:
    net = types.ModuleType("networks")
    net.available_networks, net.networks_in_memory, net.loaded_networks = {}, {}, []

    def list_available_networks():
        net.available_networks.clear()
        for f in sorted(lora_dir.iterdir()):
            if f.suffix in (".safetensors", ".pt", ".ckpt"):
                net.available_networks[f.stem] = Entry(f.stem, str(f))
    net.list_available_networks = list_available_networks
    if forge:       # Forge caches the file's tensors; Forge Neo reads it each time (a partial)
        def load_lora_state_dict(filename):
            return filename
        net.load_lora_state_dict = functools.partial(load_lora_state_dict) if neo else \
            functools.lru_cache(maxsize=5)(load_lora_state_dict)
    return net


@pytest.fixture()
def webui(tmp_path, monkeypatch):
    """A fake A1111 with a LoRA folder holding three small synthetic SD1.5 LoRAs; yields
    (lora_dir, callbacks, fakes)."""
    from core.save import save_kohya
    from core.synthetic import perturbed_lora, random_lora

    lora_dir = tmp_path / "models" / "Lora"
    lora_dir.mkdir(parents=True)
    base = random_lora("sd1", rank=4, seed=1, limit=6)
    save_kohya(base, str(lora_dir / "style_a.safetensors"))
    save_kohya(perturbed_lora(base, 0.2, seed=2), str(lora_dir / "style_b.safetensors"))
    save_kohya(random_lora("sd1", rank=4, seed=3, limit=6), str(lora_dir / "other.safetensors"))
    (tmp_path / "outside.safetensors").write_bytes((lora_dir / "other.safetensors").read_bytes())

    modules = types.ModuleType("modules")
    modules.__path__ = []
    callbacks = Callbacks()
    shared = types.ModuleType("modules.shared")
    shared.cmd_opts = types.SimpleNamespace(lora_dir=str(lora_dir), lyco_dir_backcompat=str(tmp_path / "LyCORIS"))
    shared.opts = types.SimpleNamespace()
    shared.state = State()
    shared.sd_model = torch.nn.Sequential(Layer(), Layer())
    processing = Processing()
    call_queue = types.ModuleType("modules.call_queue")
    import threading
    call_queue.queue_lock = threading.Lock()
    for name, mod in (("modules", modules), ("modules.script_callbacks", callbacks), ("modules.shared", shared),
                      ("modules.processing", processing), ("modules.call_queue", call_queue),
                      ("networks", fake_networks(lora_dir, forge=False))):
        monkeypatch.setitem(sys.modules, name, mod)
        if "." in name:
            setattr(modules, name.split(".")[1], mod)
    sys.modules["networks"].list_available_networks()
    yield lora_dir, callbacks, types.SimpleNamespace(shared=shared, processing=processing)


def load_script():
    """Execute the script the way the WebUI does (modules/script_loading.py): by path,
    module name = file name."""
    spec = importlib.util.spec_from_file_location(SCRIPT.name, SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def ext(webui):
    load_script()
    return types.SimpleNamespace(
        routes=importlib.import_module(f"{PACK}.sdwebui.routes"),
        service=importlib.import_module(f"{PACK}.sdwebui.service"),
        tab=importlib.import_module(f"{PACK}.sdwebui.tab"),
        host=importlib.import_module(f"{PACK}.sdwebui.host"),
        lora_dir=webui[0], callbacks=webui[1], fakes=webui[2])


# ----------------------------------------------------------------------------- registration

def test_script_registers_tab_settings_routes_under_a_private_name(webui):
    before_core = sys.modules.get("core")
    load_script()
    registered = webui[1].registered
    assert set(registered) == {"on_ui_tabs", "on_app_started", "on_ui_settings", "on_after_component"}
    assert all(len(v) == 1 for v in registered.values())
    private = sys.modules[f"{PACK}.core"]
    assert private.__file__ == str(ROOT / "core" / "__init__.py")
    assert sys.modules.get("core") is before_core          # never a top-level "core" of ours
    service = sys.modules[f"{PACK}.sdwebui.service"]
    assert service.LoraError is sys.modules[f"{PACK}.core.errors"].LoraError
    # the ComfyUI side is never imported
    assert not any(name.startswith(f"{PACK}.nodes") for name in sys.modules)
    assert not any(name == "nodes" or name.startswith("nodes.") for name in sys.modules
                   if getattr(sys.modules[name], "__file__", "") and str(ROOT) in sys.modules[name].__file__)
    # loading again (the WebUI's "Reload UI") reuses the private package
    load_script()
    assert sys.modules[f"{PACK}.core"] is private


def test_script_outside_a_webui_logs_one_line_and_registers_nothing(monkeypatch, caplog):
    monkeypatch.delitem(sys.modules, "modules", raising=False)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "stable-diffusion-webui" not in p])
    load_script()
    assert "dependency is missing" in caplog.text


def test_routes_registered_on_app_started(ext, monkeypatch):
    import typing
    added, endpoints = [], []

    def add_api_route(path, fn, methods):
        added.append((path, tuple(methods)))
        endpoints.append(fn)
    app = types.SimpleNamespace(add_api_route=add_api_route)
    for name in ("starlette", "starlette.concurrency", "starlette.requests", "starlette.responses"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))

    class Request:
        pass
    sys.modules["starlette.concurrency"].run_in_threadpool = None
    sys.modules["starlette.requests"].Request = Request
    sys.modules["starlette.responses"].JSONResponse = object
    ext.callbacks.registered["on_app_started"][0](None, app)
    # FastAPI injects the request by the annotation, resolved in the endpoint's globals
    assert all(typing.get_type_hints(fn) == {"request": Request} for fn in endpoints)
    assert added == [("/grassmann-lora/v1/loras", ("GET",)), ("/grassmann-lora/v1/applied", ("GET",))] + [
        (f"/grassmann-lora/v1/{op}", ("POST",)) for op in ("similarity", "kernel", "merge", "convert", "compare")]


# ----------------------------------------------------------------------------- routes

def test_loras_route_lists_the_webui_names(ext):
    status, answer = ext.routes.handle("loras", {})
    assert status == 200
    assert [x["name"] for x in answer["loras"]] == ["other", "style_a", "style_b"]
    assert answer["loras"][1]["file"] == "style_a.safetensors"
    assert all(x["size"] > 0 for x in answer["loras"])


def test_applied_route_counts_matched_modules(ext):
    net = sys.modules["networks"]
    entry = net.available_networks["style_a"]
    net.loaded_networks.append(types.SimpleNamespace(name="style_a", network_on_disk=entry,
                                                     modules={f"m{i}": None for i in range(5)}))
    status, answer = ext.routes.handle("applied", {})
    assert status == 200
    assert answer["applied"] == [{"name": "style_a", "filename": "style_a.safetensors", "matched_modules": 5,
                                  "file_modules": 6}]


def test_similarity_route(ext):
    status, answer = ext.routes.handle("similarity", {"a": "style_a", "b": "style_a.safetensors",
                                                      "module": "lora_unet_down_blocks_0_attentions_0_"
                                                                "transformer_blocks_0_attn1_to_q"})
    assert status == 200, answer
    assert {"a", "b", "side", "summary", "report", "module", "phi_grid"} <= set(answer)
    phis = [m["phi"] for m in answer["report"]["modules"] if m.get("phi") is not None]
    assert phis and all(abs(p - 1) < 1e-6 for p in phis)          # a file against itself
    grid = answer["phi_grid"]["out"]
    assert abs(grid[-1][-1] - 1) < 1e-6
    status, related = ext.routes.handle("similarity", {"a": "style_a", "b": "style_b", "images": True})
    status2, unrelated = ext.routes.handle("similarity", {"a": "style_a", "b": "other"})
    mean = lambda a: sum(m["phi"] for m in a["report"]["modules"]) / len(a["report"]["modules"])  # noqa: E731
    assert mean(related) > 3 * mean(unrelated)
    assert len(related["heatmap_png"]) > 100


def test_kernel_route(ext):
    status, answer = ext.routes.handle("kernel", {"loras": ["style_a", "style_b", "other"], "clusters": 2})
    assert status == 200, answer
    m = answer["result"]["matrix"]
    assert len(m) == 3 and all(abs(m[i][i] - 1) < 1e-9 for i in range(3))
    labels = answer["result"]["labels"]
    assert labels[0] == labels[1] != labels[2]


def test_merge_route_saves_new_names_0644_and_reports(ext):
    body = {"loras": ["style_a", "style_b"], "method": "svd", "weights": [0.5, 0.5]}
    status, first = ext.routes.handle("merge", body)
    assert status == 200, first
    status, second = ext.routes.handle("merge", body)
    assert first["name"] != second["name"]                                  # a new name each time
    path = ext.lora_dir / first["file"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert first["prompt"] == f"<lora:{first['name']}:1>"
    assert first["report"]["method"] == "svd" and first["report"]["summary"]["modules"] == 6
    assert first["overwritten"] is False and first["caches_cleared"] == []
    assert first["name"] in sys.modules["networks"].available_networks     # list refreshed
    from core.formats import load_lora
    merged = load_lora(str(path))
    assert all(k.startswith("lora_unet_") or k.startswith("lora_te_") for k in merged.modules)


def test_every_merge_method_offered(ext):
    from core.merge import METHODS
    assert ext.service.merge_methods() == tuple(METHODS)
    for method in METHODS:
        status, answer = ext.routes.handle("merge", {"loras": ["style_a", "style_b"], "method": method,
                                                     "name": f"m-{method}"})
        assert status == 200, (method, answer)
        assert (ext.lora_dir / f"m-{method}.safetensors").is_file()


def _factors(path) -> dict:
    from core.formats import load_lora
    return {n: (m.up.double() * m.scale, m.down.double()) for n, m in load_lora(str(path)).modules.items()}


@pytest.mark.parametrize("method, extra", [
    ("svd", {"rank": "auto", "energy": 0.6}),
    ("linear", {"normalise": True}),
    ("linear", {"block_weights": ["IN01=0.25", None]}),
    ("ties", {"space": "full", "ties_density": 0.5, "seed": 3}),
    ("tsv", {"keep": 0.5}),
], ids=["rank-auto", "normalise", "block-weights", "space-full", "tsv-keep"])
def test_merge_route_passes_the_cli_options_to_the_core(ext, method, extra):
    """Each new field reaches core.merge.merge: the saved file is what core makes with the same
    arguments, and not what it makes without them."""
    from core.formats import load_lora
    from core.merge import merge
    body = {"loras": ["style_a", "style_b"], "method": method, "weights": [1.0, 1.0], "dtype": "fp32"}
    status, answer = ext.routes.handle("merge", {**body, **extra, "name": "with"})
    assert status == 200, answer
    status, _ = ext.routes.handle("merge", {**body, "name": "without"})
    assert status == 200
    sources = [load_lora(str(ext.lora_dir / f"{n}.safetensors")) for n in ("style_a", "style_b")]
    core = merge(sources, [1.0, 1.0], method, **extra).lora.modules
    got, plain = _factors(ext.lora_dir / "with.safetensors"), _factors(ext.lora_dir / "without.safetensors")
    assert set(got) == set(core) and got
    for name, (up, down) in got.items():
        ref = core[name].delta()
        assert torch.allclose(up @ down, ref, atol=1e-6 * ref.abs().max())
    assert any(not torch.allclose(got[n][0] @ got[n][1], plain[n][0] @ plain[n][1], atol=1e-8) for n in got)


def test_block_weight_zero_merges_as_if_that_source_had_no_such_block(ext):
    """Every module of these LoRAs sits in IN01: A at 0 there leaves exactly w_B·ΔW_B (dense reference)."""
    from core.formats import load_lora
    status, answer = ext.routes.handle("merge", {"loras": ["style_a", "style_b"], "method": "linear",
                                                 "weights": [1.0, 0.7], "dtype": "fp32",
                                                 "block_weights": ["IN01=0", None], "name": "b-only"})
    assert status == 200, answer
    b = load_lora(str(ext.lora_dir / "style_b.safetensors")).modules
    got = _factors(ext.lora_dir / "b-only.safetensors")
    assert set(got) == set(b)
    for name, (up, down) in got.items():
        ref = 0.7 * b[name].delta()
        assert torch.allclose(up @ down, ref, atol=1e-6 * ref.abs().max())


def test_overwrite_invalidates_a1111_caches(ext):
    status, _ = ext.routes.handle("merge", {"loras": ["style_a", "style_b"], "name": "mine"})
    assert status == 200
    status, answer = ext.routes.handle("merge", {"loras": ["style_a", "other"], "name": "mine"})
    assert status == 409 and "exists" in answer["error"]
    net, fakes = sys.modules["networks"], ext.fakes
    net.networks_in_memory["mine"] = object()
    net.loaded_networks.append(types.SimpleNamespace(name="mine"))
    status, answer = ext.routes.handle("merge", {"loras": ["style_a", "other"], "name": "mine", "overwrite": True})
    assert status == 200 and answer["overwritten"] is True
    assert "mine" not in net.networks_in_memory and not net.loaded_networks
    assert all(layer.network_current_names == () for layer in fakes.shared.sd_model)
    assert fakes.processing.StableDiffusionProcessing.cached_c == [None, None]
    assert fakes.processing.StableDiffusionProcessing.cached_uc == [None, None]


@pytest.mark.parametrize("neo", [False, True], ids=["forge", "forge-neo"])
def test_overwrite_invalidates_forge_caches(ext, monkeypatch, neo):
    net = fake_networks(ext.lora_dir, forge=True, neo=neo)
    net.list_available_networks()
    monkeypatch.setitem(sys.modules, "networks", net)
    loader = types.SimpleNamespace(loaded_hash="['x']")
    unet = types.SimpleNamespace(model=types.SimpleNamespace(lora_loader=loader))
    clip_loader = types.SimpleNamespace(loaded_hash="['y']")
    clip = types.SimpleNamespace(patcher=types.SimpleNamespace(model=types.SimpleNamespace(lora_loader=clip_loader)))
    ext.fakes.shared.sd_model = types.SimpleNamespace(
        current_lora_hash="[['mine.safetensors', 1.0, 1.0, False]]",
        forge_objects=types.SimpleNamespace(unet=unet, clip=clip),
        forge_objects_original=types.SimpleNamespace(unet=unet, clip=clip))
    net.load_lora_state_dict("x")
    if not neo:
        assert net.load_lora_state_dict.cache_info().currsize == 1
    ext.routes.handle("merge", {"loras": ["style_a", "style_b"], "name": "mine"})
    status, answer = ext.routes.handle("merge", {"loras": ["style_a", "other"], "name": "mine", "overwrite": True})
    assert status == 200, answer
    assert ("load_lora_state_dict" in answer["caches_cleared"]) is not neo
    if not neo:
        assert net.load_lora_state_dict.cache_info().currsize == 0
    assert ext.fakes.shared.sd_model.current_lora_hash == "[]"
    assert loader.loaded_hash != "['x']" and clip_loader.loaded_hash != "['y']"
    assert answer["caches_cleared"].count("lora_loader") == 2


@pytest.mark.parametrize("op, body, status, words", [
    ("merge", {"loras": ["style_a", "nope"]}, 404, "no LoRA named 'nope'"),
    ("merge", {"loras": ["style_a", "../../outside.safetensors"]}, 403, "outside the WebUI's LoRA folders"),
    ("merge", {"loras": ["style_a"]}, 400, "at least 2"),
    ("merge", {"loras": ["style_a", "style_b"], "method": "average"}, 400, "'method' must be one of"),
    ("merge", {"loras": ["style_a", "style_b"], "rank": "4"}, 400, "'rank' must be int or 'auto'"),
    ("merge", {"loras": ["style_a", "style_b"], "block_weights": ["INS"]}, 400, "'block_weights' must list 2"),
    ("merge", {"loras": ["style_a", "style_b"], "block_weights": [1, None]}, 400, "'block_weights' must list 2"),
    ("merge", {"loras": ["style_a", "style_b"], "block_weights": ["NOPE", None]}, 400,
     "unknown block-weight preset 'NOPE'"),
    ("merge", {"loras": ["style_a", "style_b"], "energy": 1.5}, 400, "'energy': rank auto energy share must be in"),
    ("merge", {"loras": ["style_a", "style_b"], "space": "half"}, 400, "'space' must be one of core, full"),
    ("merge", {"loras": ["style_a", "style_b"], "keep": 0}, 400, "'keep': tsv keep must be in (0, 1]"),
    ("merge", {"loras": ["style_a", "style_b"], "normalise": "yes"}, 400, "'normalise' must be bool"),
    ("merge", {"loras": ["style_a", "style_b"], "normalise": True}, 400, "normalise is offered for the exact"),
    ("merge", {"loras": ["style_a", "style_b"], "method": "linear", "rank": "auto"}, 400,
     "the linear merge is exact"),
    ("merge", {"loras": ["style_a", "style_b"], "weights": [1]}, 400, "'weights' must list 2"),
    ("merge", {"loras": ["style_a", "style_b"], "name": "../x"}, 400, "not a plain file name"),
    ("merge", {"loras": ["style_a", "style_b"], "name": "style_a", "overwrite": True}, 400, "one of the sources"),
    ("merge", {"loras": ["style_a", "style_b"], "colour": 1}, 400, "unknown field(s) colour"),
    ("merge", ["style_a"], 400, "must be a JSON object"),
    ("similarity", {"a": "style_a", "b": "style_b", "side": "up"}, 400, "'side' must be one of"),
    ("similarity", {"a": "style_a", "b": "style_b", "module": "no_such_module"}, 400, "module not shared"),
    ("kernel", {"loras": ["style_a", "style_b"], "kernel": "rbf"}, 400, "'kernel' must be one of"),
    ("convert", {"lora": "style_a", "name": "style_b"}, 409, "exists"),
    ("compare", {"loras": ["style_a"], "seed": -1}, 400, "'seed' must be fixed"),
])
def test_route_errors_are_4xx_one_line(ext, op, body, status, words):
    got, answer = ext.routes.handle(op, body)
    assert got == status, answer
    assert set(answer) == {"error"} and words in answer["error"] and "\n" not in answer["error"]


def test_unexpected_failure_is_500_one_line(ext, monkeypatch):
    monkeypatch.setattr(ext.service, "list_loras", lambda refresh=False: 1 / 0)
    status, answer = ext.routes.handle("loras", {})
    assert status == 500 and answer["error"].startswith("loras failed: ZeroDivisionError")


def test_convert_route_writes_kohya_names(ext, real_loras_dir):
    import shutil
    src = real_loras_dir / "catundchat__pytorch_lora_weights.safetensors"
    shutil.copy(src, ext.lora_dir / "cat_diffusers.safetensors")
    ext.host.refresh()
    status, answer = ext.routes.handle("convert", {"lora": "cat_diffusers"})
    assert status == 200, answer
    assert answer["name"] == "cat_diffusers-kohya" and answer["source_format"] != "kohya"
    from safetensors import safe_open
    with safe_open(str(ext.lora_dir / answer["file"]), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert len({k.rsplit(".", 2)[0] for k in keys if k.endswith("lora_down.weight")}) == answer["modules"]
    assert stat.S_IMODE(os.stat(ext.lora_dir / answer["file"]).st_mode) == 0o644


def test_compare_route_renders_base_and_each_lora(ext):
    status, answer = ext.routes.handle("compare", {"loras": ["style_a", "style_b"], "prompt": "a cat",
                                                   "seed": 7, "steps": 2, "width": 64, "height": 64})
    assert status == 200, answer
    assert answer["labels"] == ["base", "style_a", "style_b"]
    assert ext.fakes.processing.prompts == ["a cat", "a cat, <lora:style_a:1>", "a cat, <lora:style_b:1>"]
    assert answer["mad"][0] == 0 and answer["mad"][1] > 0
    assert len(answer["grid_png"]) > 100


# ----------------------------------------------------------------------------- tab callbacks

def test_tab_callbacks_as_plain_functions(ext):
    tab = ext.tab
    status, summary, heat, grid = tab.similarity("style_a", "style_b", "out", 0, "")
    assert status == "" and "φ" in summary and heat.size[0] > 0 and grid is None
    status, text, heat, rows = tab.kernel(["style_a", "style_b", "other"], "projection-rbf", 1.0, "out", 0)
    assert len(rows) == 3 and heat.size[0] > 0
    status, rows, table, prompt = tab.merge(["style_a", "style_b"], "0.7, 0.3", "karcher", 0, "fp16", "", False)
    assert status.startswith("Saved merge-") and prompt.startswith("<lora:merge-") and len(rows) == 2
    assert rows[0][1] == "0.7"
    status, detail = tab.convert("style_a", "a_copy", "as stored")
    assert status == "Saved a\\_copy.safetensors." and "<lora:a_copy:1>" in detail
    status, grid, rows = tab.compare(["a_copy"], "x", "", 3, 2, 64, 64, 7.0, "Euler a", 1.0)
    assert grid.size[0] > 64 and [r[0] for r in rows] == ["base (reference)", "a_copy"]
    assert set(tab.refresh_names()) >= {"style_a", "a_copy", prompt[len("<lora:"):-len(":1>")]}


def test_tab_merge_offers_the_cli_options(ext):
    """Auto rank, block weights (one line per LoRA; an empty first line skips the first LoRA),
    normalise and the method parameters reach the core as the route's fields."""
    from core.formats import load_lora
    from core.merge import merge
    tab = ext.tab
    status, *_ = tab.merge(["style_a", "style_b"], "1, 1", "linear", 0, "fp32", "a-only", False, False, "\nIN01=0")
    assert status.startswith("Saved a-only"), status
    a = load_lora(str(ext.lora_dir / "style_a.safetensors")).modules
    for name, (up, down) in _factors(ext.lora_dir / "a-only.safetensors").items():
        assert torch.allclose(up @ down, a[name].delta(), atol=1e-6 * a[name].delta().abs().max())
    sources = [load_lora(str(ext.lora_dir / f"{n}.safetensors")) for n in ("style_a", "style_b")]
    for method, args, kw in (("svd", (True, "", False, 0.6), {"rank": "auto", "energy": 0.6}),
                             ("svd", (False, "", True), {"normalise": True}),
                             ("ties", (False, "", False, None, "full", None, 0.5, None, 3),
                              {"space": "full", "ties_density": 0.5, "seed": 3})):
        status, *_ = tab.merge(["style_a", "style_b"], "", method, 0, "fp32", "t", True, *args)
        assert status.startswith("Saved t.safetensors"), status
        core = merge(sources, None, method, **kw).lora.modules
        for name, (up, down) in _factors(ext.lora_dir / "t.safetensors").items():
            ref = core[name].delta()
            assert torch.allclose(up @ down, ref, atol=1e-6 * ref.abs().max()), (method, kw)
    status, *_ = tab.merge(["style_a", "style_b"], "", "svd", 0, "fp16", "", False, False, "INS\n-\nOUTS")
    assert status == "Error: 3 block-weight line(s) for 2 LoRA(s)"


def test_tab_errors_are_one_message_not_a_raise(ext):
    status, *rest = ext.tab.merge(["style_a"], "", "karcher", 0, "fp16", "", False)
    assert status.startswith("Error:") and "at least 2" in status and rest == [None, None, None]
    status, *_ = ext.tab.merge(["style_a", "style_b"], "1, x", "karcher", 0, "fp16", "", False)
    assert status == "Error: weights must be numbers separated by commas, got '1, x'"
    status, *_ = ext.tab.similarity("style_a", None, "out", 0, "")
    assert status == "Error: no LoRA chosen: pick one from the list (or give its name)"


def test_tab_status_reads_as_written_in_markdown(ext):
    """The status line is a gr.Markdown: a name like a/b*c<d> came out as 'a/bc' (the * opened
    emphasis, <d> was taken for HTML). Markdown's characters are backslashed; unescaped, the
    line is the message."""
    import re
    status, *_ = ext.tab.merge(["style_a", "style_b"], "", "karcher", 0, "fp16", "a/b*c<d>_[x]`$", False)
    assert not re.search(r"(?<!\\)[*_<>\[\]`$]", status), status
    assert re.sub(r"\\(.)", r"\1", status).startswith("Error: 'a/b*c<d>_[x]`$' is not a plain file name")


def test_interrupt_stops_a_merge(ext):
    calls = []

    def progress(done_total, desc=None):
        calls.append(done_total)
        ext.tab.STOP.set()           # the Interrupt button pressed during the first module
    status, *_ = ext.tab.merge(["style_a", "style_b"], "", "svd", 0, "fp16", "stopped", False, progress=progress)
    assert status == "Interrupted." and len(calls) == 1
    assert not (ext.lora_dir / "stopped.safetensors").exists()


def test_copy_settings_fixes_a_random_seed(ext):
    copy = ext.tab.copy_settings(["prompt", "seed"])
    assert copy("a cat", -1) == ("a cat", 1234)
    assert copy("a cat", 5) == ("a cat", 5)


# ----------------------------------------------------------------------------- install.py, Pillow 9.5

def _install(monkeypatch, present: set[str], launch=None):
    import runpy
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (real_find_spec(name, *a) if name in present else None))
    calls = []
    monkeypatch.setattr("subprocess.check_call", lambda cmd: calls.append(cmd))
    if launch is not None:
        monkeypatch.setitem(sys.modules, "launch", launch)
    module = runpy.run_path(str(ROOT / "install.py"), run_name="grassmann_install")
    return module["main"](), calls


def test_install_in_a1111_uses_launch_and_never_touches_pins(monkeypatch):
    pip = []
    launch = types.SimpleNamespace(is_installed=lambda name: name != "safetensors",
                                   run_pip=lambda args, desc: pip.append(args))
    rc, calls = _install(monkeypatch, {"torch", "launch"}, launch)
    assert rc == 0 and pip == ["install safetensors"] and calls == []


def test_install_under_comfyui_manager_repeats_nothing(monkeypatch):
    rc, calls = _install(monkeypatch, {"torch", "safetensors", "numpy", "PIL"})
    assert rc == 0 and calls == []


def test_install_by_hand_installs_only_what_is_missing(monkeypatch):
    rc, calls = _install(monkeypatch, {"torch", "numpy", "PIL"})
    assert rc == 0 and calls == [[sys.executable, "-m", "pip", "install", "safetensors>=0.4"]]


def test_install_without_torch_says_so(monkeypatch, capsys):
    rc, calls = _install(monkeypatch, {"numpy"})
    assert rc == 1 and calls == [] and "torch is not installed" in capsys.readouterr().err


def test_compare_grid_labels_fit_on_any_pillow():
    """Pillow < 10.1 (the WebUIs pin 9.5) has only a Latin-1 bitmap font: long and
    non-Latin labels must be shortened and drawn without raising."""
    from core.compare_grid import compare_grid
    images = torch.rand(2, 16, 16, 3)
    result = compare_grid(images, ["merge of style_a and style_b at rank 4 " * 3 + "φ→…", "ünï ✓ 画"], upscale=2)
    assert result.grid.size == (result.geometry.width, result.geometry.height)
    assert result.mad[0] == 0 and result.mad[1] > 0
