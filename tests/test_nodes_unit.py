"""The ComfyUI node classes without ComfyUI: declared structure, Compare Grid
geometry and SSIM, Save path safety, and the nodes that need no ComfyUI run on
synthetic LoRAs (checked against core called directly)."""
from __future__ import annotations

import hashlib
import json
import importlib
import importlib.util
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PACK = "grassmann_lora"


def _import_pack():
    """Import the repository as the package ComfyUI makes of it (nodes/ uses
    relative imports such as ``from ..core.save import …``)."""
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{PACK}.nodes")


nodes_pkg = _import_pack()
NODE_CLASS_MAPPINGS = nodes_pkg.NODE_CLASS_MAPPINGS
NODE_DISPLAY_NAME_MAPPINGS = nodes_pkg.NODE_DISPLAY_NAME_MAPPINGS
common = importlib.import_module(f"{PACK}.nodes.common")
GrassmannLoRACompareGrid = importlib.import_module(f"{PACK}.nodes.grid").GrassmannLoRACompareGrid
save_lora = importlib.import_module(f"{PACK}.nodes.lora_io").save_lora
# core as the nodes see it (its classes, e.g. LoraError, are the pack's own)
core = importlib.import_module(f"{PACK}.core")
LoraError = importlib.import_module(f"{PACK}.core.errors").LoraError
synthetic = importlib.import_module(f"{PACK}.core.synthetic")
random_lora, perturbed_lora = synthetic.random_lora, synthetic.perturbed_lora


def pack(name: str):
    """A pack submodule, e.g. pack('core.similarity')."""
    return importlib.import_module(f"{PACK}.{name}")

VALID_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "IMAGE", "MODEL", "CLIP", common.LORA_TYPE}


# ----------------------------------------------------------------------------- structure

def _inputs(cls) -> dict:
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"}
    out = {}
    for section in ("required", "optional"):
        out.update(spec.get(section, {}))
    return out


@pytest.mark.parametrize("node_id", sorted(NODE_CLASS_MAPPINGS))
def test_node_declarations(node_id):
    cls = NODE_CLASS_MAPPINGS[node_id]
    assert node_id.startswith("GrassmannLoRA")
    assert NODE_DISPLAY_NAME_MAPPINGS[node_id]
    assert cls.CATEGORY == "Grassmann LoRA"
    assert callable(getattr(cls, cls.FUNCTION))
    assert isinstance(cls.RETURN_TYPES, tuple) and cls.RETURN_TYPES
    assert all(t in VALID_TYPES for t in cls.RETURN_TYPES), cls.RETURN_TYPES
    for attr in ("RETURN_NAMES", "OUTPUT_TOOLTIPS"):
        if hasattr(cls, attr):
            assert len(getattr(cls, attr)) == len(cls.RETURN_TYPES), attr
    inputs = _inputs(cls)
    assert inputs
    for name, spec in inputs.items():
        kind, opts = spec[0], spec[1]
        assert isinstance(kind, list) or kind in VALID_TYPES, (name, kind)
        assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
        if isinstance(kind, list) and kind and "default" in opts:
            assert opts["default"] in kind


def test_pack_import_is_cheap():
    """Importing the pack (what ComfyUI does at start) loads neither torch nor core."""
    import subprocess
    code = ("import importlib.util, sys; "
            f"spec = importlib.util.spec_from_file_location('gl_pack', {str(ROOT / '__init__.py')!r}, "
            f"submodule_search_locations=[{str(ROOT)!r}]); "
            "m = importlib.util.module_from_spec(spec); sys.modules['gl_pack'] = m; spec.loader.exec_module(m); "
            "print(len(m.NODE_CLASS_MAPPINGS), 'torch' in sys.modules, 'gl_pack.core' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == [str(len(NODE_CLASS_MAPPINGS)), "False", "False"], out.stdout + out.stderr


def test_host_adapters_import_no_cli_code():
    """nodes/ (ComfyUI) and sdwebui/ (WebUI) are adapters over the library: nothing from
    core/commands (the CLI)."""
    import ast
    for path in sorted([*(ROOT / "nodes").glob("*.py"), *(ROOT / "sdwebui").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                assert "commands" not in name.split("."), f"{path.name} imports {name}"


def test_display_names_unique_and_mapped():
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_CLASS_MAPPINGS)
    assert len(set(NODE_DISPLAY_NAME_MAPPINGS.values())) == len(NODE_DISPLAY_NAME_MAPPINGS)


def test_dynamic_lora_slots_declared_in_order():
    for node_id in ("GrassmannLoRAKernelMatrix", "GrassmannLoRAKarcherMerge", "GrassmannLoRAMergeFidelity"):
        optional = NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()["optional"]
        slots = [k for k in optional if k.startswith("lora_")]
        assert slots == [f"lora_{k}" for k in range(1, common.MAX_LORAS + 1)]
        assert all(optional[k][0] == common.LORA_TYPE for k in slots)


def test_connected_loras_numeric_order_and_weights():
    a, b, c = object(), object(), object()
    got = common.connected_loras({"lora_10": c, "lora_2": b, "lora_1": a, "lora_3": None, "rank": 4})
    assert [k for k, _ in got] == ["lora_1", "lora_2", "lora_10"]
    assert [v for _, v in got] == [a, b, c]
    assert common.parse_weights(" ", 3) is None
    assert common.parse_weights("1, 0.5;2", 3) == [1.0, 0.5, 2.0]
    with pytest.raises(LoraError, match="2 number"):
        common.parse_weights("1, 2", 3)
    with pytest.raises(LoraError, match="expected numbers"):
        common.parse_weights("1, x, 2", 3)


# ----------------------------------------------------------------------------- SSIM

def _ssim_direct(x: np.ndarray, y: np.ndarray, win: int = 11, sigma: float = 1.5) -> float:
    """Wang et al. 2004 written out: for every valid window position the
    Gaussian-weighted means, variances and covariance, then the mean of the
    SSIM map, per channel, averaged over channels."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    r = np.arange(win) - (win - 1) / 2
    w2 = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma ** 2))
    w2 /= w2.sum()
    h, w, ch = x.shape
    per_channel = []
    for c in range(ch):
        vals = []
        for i in range(h - win + 1):
            for j in range(w - win + 1):
                a = x[i:i + win, j:j + win, c]
                b = y[i:i + win, j:j + win, c]
                ma, mb = (w2 * a).sum(), (w2 * b).sum()
                va = (w2 * (a - ma) ** 2).sum()
                vb = (w2 * (b - mb) ** 2).sum()
                cov = (w2 * (a - ma) * (b - mb)).sum()
                vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) /
                            ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
        per_channel.append(np.mean(vals))
    return float(np.mean(per_channel))


def test_ssim_matches_direct_formula():
    ssim = pack("core.compare_grid").ssim

    rng = np.random.default_rng(0)
    x = rng.random((23, 19, 3))
    y = np.clip(0.7 * x + 0.3 * rng.random((23, 19, 3)), 0, 1)   # correlated, not equal
    got = float(ssim(torch.from_numpy(x), torch.from_numpy(y)))
    want = _ssim_direct(x, y)
    assert abs(got - want) < 1e-10, (got, want)
    assert 0.2 < want < 0.99
    # batched form gives the same per-image numbers
    batch = ssim(torch.from_numpy(np.stack([x, y])), torch.from_numpy(np.stack([y, y])))
    assert abs(float(batch[0]) - want) < 1e-10 and abs(float(batch[1]) - 1.0) < 1e-12


def test_ssim_small_image_uses_smaller_window():
    ssim = pack("core.compare_grid").ssim

    rng = np.random.default_rng(1)
    x, y = rng.random((8, 9, 1)), rng.random((8, 9, 1))
    got = float(ssim(torch.from_numpy(x), torch.from_numpy(y)))
    assert abs(got - _ssim_direct(x, y, win=7)) < 1e-10


def test_mean_abs_diff():
    mean_abs_diff = pack("core.compare_grid").mean_abs_diff

    rng = np.random.default_rng(2)
    x, y = rng.random((2, 5, 6, 3)), rng.random((2, 5, 6, 3))
    got = mean_abs_diff(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    assert np.allclose(got, np.abs(x - y).reshape(2, -1).mean(axis=1), atol=1e-14)


# ----------------------------------------------------------------------------- Compare Grid

def test_parse_labels():
    parse_labels = pack("core.compare_grid").parse_labels

    assert parse_labels("a, b ,c", 3) == ["a", "b", "c"]
    assert parse_labels("x, y\nsecond", 3) == ["x, y", "second", "#3"]
    assert parse_labels("", 2) == ["#1", "#2"]
    assert parse_labels("a,,c,d", 3) == ["a", "#2", "c"]


def test_compare_grid_geometry_and_tiles():
    PAD = pack("core.compare_grid").PAD

    rng = np.random.default_rng(3)
    imgs = torch.from_numpy(rng.random((3, 20, 30, 3)).astype(np.float32))
    imgs[2] = imgs[0]                      # an exact copy of the reference
    out = GrassmannLoRACompareGrid().run(imgs, "ref\nother\ncopy", reference=0, columns=2, upscale=3)
    grid, text = out["result"]
    assert grid.shape[0] == 1 and grid.shape[3] == 3
    # 2 columns of 90-px tiles, 2 rows of 60-px tiles plus captions, PAD around each
    caption_height = pack("core.compare_grid").caption_height
    assert grid.shape[2] == 2 * 90 + 3 * PAD
    assert grid.shape[1] == 2 * (60 + caption_height()) + 3 * PAD
    g = grid[0].numpy()
    for k in range(3):
        r, c = divmod(k, 2)
        x0, y0 = PAD + c * (90 + PAD), PAD + r * (60 + caption_height() + PAD)
        want = np.repeat(np.repeat(np.round(imgs[k].numpy() * 255), 3, axis=0), 3, axis=1) / 255.0
        assert np.allclose(g[y0:y0 + 60, x0:x0 + 90], want, atol=1e-6), k
        caption = g[y0 + 60:y0 + 60 + caption_height(), x0:x0 + 90]
        assert (caption < 0.5).any(), "caption text missing"
    assert np.all(g[:PAD] == 1.0)          # white border
    # the fourth cell (empty) stays white
    x3, y3 = PAD + 90 + PAD, PAD + 60 + caption_height() + PAD
    assert np.all(g[y3:y3 + 60, x3:x3 + 90] == 1.0)
    # the numbers in the table: copy of the reference has MAD 0, SSIM 1
    rows = out["ui"][common.TABLE_UI_KEY][0]["rows"]
    assert rows[0][0] == "ref (reference)"
    assert float(rows[2][1]) == 0.0 and float(rows[2][2]) == 1.0
    assert float(rows[1][1]) > 0.1 and float(rows[1][2]) < 0.5
    assert text.splitlines()[2].split("\t")[0] == "other"


def test_compare_grid_auto_upscale_and_bad_reference():
    MIN_TILE, grid_geometry = pack("core.compare_grid").MIN_TILE, pack("core.compare_grid").grid_geometry

    geo = grid_geometry(5, 64, 64)
    assert geo.cols == 5 and geo.rows == 1 and geo.scale == math.ceil(MIN_TILE / 64)
    assert grid_geometry(2, 300, 300).scale == 1
    with pytest.raises(LoraError, match="reference index 4"):
        GrassmannLoRACompareGrid().run(torch.zeros(2, 8, 8, 3), "", reference=4, columns=0, upscale=1)


# ----------------------------------------------------------------------------- Save

def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_save_writes_kohya_numbered_and_refuses_escape(tmp_path):
    from safetensors.torch import load_file
    kohya_tensors = pack("core.save").kohya_tensors

    folder = tmp_path / "loras"
    folder.mkdir()
    lora = random_lora("sd1", rank=4, seed=0, limit=6)
    path, name = save_lora(lora, str(folder), "merged/test", None, False)
    assert name == "merged/test_00001.safetensors" and os.path.isfile(path)
    saved = load_file(path)
    want = kohya_tensors(lora)
    assert set(saved) == set(want)
    for k in want:
        assert torch.equal(saved[k], want[k]), k

    # a re-run (overwrite off) never fails and never replaces: the next number
    before = _sha(path)
    other = random_lora("sd1", rank=4, seed=1, limit=6)
    path2, name2 = save_lora(other, str(folder), "merged/test.safetensors", None, False)
    assert name2 == "merged/test_00002.safetensors" and _sha(path) == before
    # overwrite on: exactly the name typed, replaced on the next run
    path3, name3 = save_lora(other, str(folder), "merged/test.safetensors", None, True)
    assert name3 == "merged/test.safetensors"
    first = _sha(path3)
    save_lora(lora, str(folder), "merged/test.safetensors", None, True)
    assert _sha(path3) != first
    # another model extension is replaced, not kept in front of .safetensors
    assert save_lora(lora, str(folder), "x.pt", None, True)[1] == "x.safetensors"

    for bad in ("../escape.safetensors", str(tmp_path / "abs.safetensors"), "a/../../x.safetensors",
                "a\x00b", "..\\..\\x", "C:\\Windows\\x", "~/x", ".", "sub/", "a\nb", "", "  ",
                "a:b", "x" * 300):
        with pytest.raises(LoraError) as err:
            save_lora(lora, str(folder), bad, None, True)
        assert "\n" not in str(err.value) and "--overwrite" not in str(err.value), bad
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loras"]
    assert sorted(p.name for p in folder.iterdir()) == ["merged", "x.safetensors"]


def test_save_metadata_recipe_or_source(tmp_path):
    from safetensors import safe_open

    a = random_lora("sd1", rank=4, seed=0, limit=4, path="a.safetensors")
    a.metadata["ss_output_name"] = "my style"
    b = random_lora("sd1", rank=4, seed=1, limit=4, path="b.safetensors")
    merged = pack("core.merge").merge([a, b], None, "svd", 2).lora
    for lora, name in ((a, "conv"), (merged, "merged")):
        path, _ = save_lora(lora, str(tmp_path), name)
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        if lora is a:
            assert meta["ss_output_name"] == "my style" and meta["grassmann_lora.source_file"] == "a.safetensors"
        else:
            assert json.loads(meta["grassmann_lora.merge"])["method"] == "svd"
            assert "grassmann_lora.source_file" not in meta


def test_save_symlink_escape_refused(tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (folder / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(LoraError, match="escapes"):
        save_lora(random_lora("sd1", rank=2, seed=0, limit=2), str(folder), "link/x.safetensors")
    assert list(outside.iterdir()) == []


def test_save_dtype_cast(tmp_path):
    from safetensors.torch import load_file

    lora = random_lora("sd1", rank=4, seed=0, limit=3)
    path, _ = save_lora(lora, str(tmp_path), "half", common.save_dtype("fp16"))
    t = load_file(path)
    downs = [v for k, v in t.items() if k.endswith("lora_down.weight")]
    assert downs and all(v.dtype == torch.float16 for v in downs)
    assert all(v.dtype == torch.float32 for k, v in t.items() if k.endswith(".alpha"))


# ----------------------------------------------------------------------------- Similarity

def test_similarity_node_matches_core():
    compare = pack("core.similarity").compare
    GrassmannLoRASimilarity = pack("nodes.analysis").GrassmannLoRASimilarity

    a = random_lora("sd1", rank=4, seed=0, limit=12)
    b = perturbed_lora(a, 0.3, seed=1)
    out = GrassmannLoRASimilarity().run(a, b, side="out", top=0, module="")
    heat, grid, summary = out["result"]
    ref = compare(a, b, side="out")
    assert summary == ref.text_summary()
    assert heat.dim() == 4 and heat.shape[0] == 1 and heat.shape[3] == 3
    assert float(heat.min()) >= 0 and float(heat.max()) <= 1
    head = out["ui"][common.TABLE_UI_KEY][0]
    agg = ref.summary()["sides"]["out"]
    assert head["rows"][0][2] == f"{agg['phi_mean']:.4f}"
    # the default φ grid is the most similar module; its image matches core's
    best = agg["most_similar"][0]["module"]
    want = np.asarray(ref.grid_image(best, "out"), dtype=np.float32) / 255.0
    assert grid.shape[1:3] == want.shape[:2]
    assert np.allclose(grid[0].numpy(), want)


def test_similarity_module_lookup_and_errors():
    GrassmannLoRASimilarity = pack("nodes.analysis").GrassmannLoRASimilarity

    a = random_lora("sd1", rank=4, seed=0, limit=12)
    b = random_lora("sd1", rank=4, seed=1, limit=12)
    name = next(iter(a.modules))
    short = name.removeprefix("lora_unet_")
    out = GrassmannLoRASimilarity().run(a, b, side="in", top=2, module=short)
    assert name in out["ui"][common.TABLE_UI_KEY][0]["note"]
    with pytest.raises(LoraError, match="not shared"):
        GrassmannLoRASimilarity().run(a, b, side="out", top=0, module="no_such_module")
    sd2 = random_lora("sd2", rank=4, seed=0, limit=4)
    with pytest.raises(LoraError):
        GrassmannLoRASimilarity().run(a, sd2, side="out", top=0, module="")


# ----------------------------------------------------------------------------- Kernel Matrix

def test_kernel_matrix_node_matches_core():
    km_mod = pack("core.kernel_matrix")
    node = pack("nodes.analysis").GrassmannLoRAKernelMatrix()
    a = random_lora("sd1", rank=4, seed=0, limit=10, path="a.safetensors")
    b = perturbed_lora(a, 0.2, seed=1, path="b.safetensors")
    c = random_lora("sd1", rank=4, seed=2, limit=10, path="c.safetensors")
    out = node.run("projection-rbf", 0.5, 2.0, "out", 0, "", "spectral", 2, 0.5, 2, False, 0,
                   lora_1=a, lora_3=c, lora_2=b)                     # slot order, not keyword order
    heat, clusters, matrix_json = out["result"]
    km = km_mod.compute_kernel_matrix([a, b, c], "projection-rbf", 0.5, 2.0, "out")
    res = km_mod.cluster_kernel_matrix(km, "spectral", 2, seed=0)
    assert clusters == km.clusters_text(res)
    assert json.loads(matrix_json) == json.loads(km.to_json(result=res))
    assert np.allclose(np.array(json.loads(matrix_json)["matrix"]), km.matrix)
    # a and its perturbation cluster together, c alone
    labels = json.loads(matrix_json)["labels"]
    assert labels[0] == labels[1] != labels[2]
    tables = out["ui"][common.TABLE_UI_KEY]
    shown = np.array([[float(x) for x in row[1:]] for row in tables[1]["rows"]])
    order = res.order
    assert np.allclose(shown, km.matrix[np.ix_(order, order)], atol=5e-4)
    # rows and columns are named by the node's inputs (lora_1 …), as in the LoRAs table
    assert [r[0] for r in tables[1]["rows"]] == [f"lora_{i + 1}" for i in order]
    assert tables[1]["columns"][1:] == [f"lora_{i + 1}" for i in order]
    assert [r[:2] for r in tables[0]["rows"]] == [[f"lora_{i + 1}", "abc"[i] + ".safetensors"] for i in order]
    assert heat.shape[0] == 1 and heat.shape[3] == 3


def test_kernel_matrix_node_errors_and_no_clustering():
    node = pack("nodes.analysis").GrassmannLoRAKernelMatrix()
    with pytest.raises(LoraError, match="connect at least one"):
        node.run("projection-rbf", 1.0, 2.0, "out", 0, "", "spectral", 0, 0.5, 2, False, 0)
    a = random_lora("sd1", rank=4, seed=0, limit=4)
    sd2 = random_lora("sd2", rank=4, seed=0, limit=4)
    with pytest.raises(LoraError):
        node.run("projection-rbf", 1.0, 2.0, "out", 0, "", "spectral", 0, 0.5, 2, False, 0,
                 lora_1=a, lora_2=sd2)
    out = node.run("projection-rbf", 1.0, 2.0, "out", 0, "", "none", 0, 0.5, 2, False, 0,
                   lora_1=a, lora_2=random_lora("sd1", rank=4, seed=5, limit=4))
    assert out["result"][1] == "no clustering"


# ----------------------------------------------------------------------------- Karcher Merge

def test_merge_node_matches_core_and_leaves_model_alone():
    merge = pack("core.merge").merge
    node = pack("nodes.merge").GrassmannLoRAKarcherMerge()
    a = random_lora("sd1", rank=4, seed=0, limit=6, path="a.safetensors")
    b = perturbed_lora(a, 0.3, seed=1, path="b.safetensors")
    model, clip = object(), object()
    # strengths 0: like LoraLoader, MODEL/CLIP pass through untouched (no ComfyUI needed)
    out = node.run(model, clip, "karcher", 0, "0.7, 0.3", "fp16", 0.0, 0.0, 0.2, 0.5, 0,
                   lora_1=a, lora_2=b)
    m, c, merged, text = out["result"]
    assert m is model and c is clip
    ref = merge([a, b], [0.7, 0.3], "karcher", None, dtype=torch.float16)
    assert text == ref.report.table()
    assert set(merged.modules) == set(ref.lora.modules)
    for name, mod in ref.lora.modules.items():
        assert merged.modules[name].dtype == torch.float16
        assert torch.equal(merged.modules[name].up, mod.up) and torch.equal(merged.modules[name].down, mod.down)
    shown = out["ui"][common.TABLE_UI_KEY]
    sources = shown[0]["rows"]
    assert [r[0] for r in sources] == ["lora_1", "lora_2"]
    assert [r[1] for r in sources] == ["a", "b"] and sources[0][2] == "0.7"
    # the per-group report is a table (not preformatted text), its sources named by input
    groups = next(t for t in shown if t["title"] == "By block group")
    head, rows = ref.report.group_rows(["lora_1", "lora_2"])
    assert groups["columns"] == head and groups["rows"] == rows and rows[-1][0] == "all"
    assert "kept lora_1" in head and not any("text" in t for t in shown)
    kept = ref.report.summary()["kept"]["a.safetensors"]
    assert sources[0][3] == f"{kept:.3f}"


def test_merge_node_karcher_max_iter_reaches_core():
    merge = pack("core.merge").merge
    node = pack("nodes.merge").GrassmannLoRAKarcherMerge()
    a = random_lora("sd1", rank=4, seed=0, limit=4, path="a.safetensors")
    b = random_lora("sd1", rank=4, seed=1, limit=4, path="b.safetensors")
    c = random_lora("sd1", rank=4, seed=2, limit=4, path="c.safetensors")
    out = node.run(None, None, "karcher", 0, "", "fp32", 0.0, 0.0, 0.2, 0.5, 0, karcher_max_iter=3,
                   lora_1=a, lora_2=b, lora_3=c)
    ref = merge([a, b, c], None, "karcher", None, dtype=torch.float32, max_iter=3)
    assert out["result"][3] == ref.report.table()
    assert ref.report.summary()["karcher"]["iterations_max"] == 3     # unrelated: stopped by the limit
    declared = node.INPUT_TYPES()["optional"]["karcher_max_iter"]
    assert declared[0] == "INT" and declared[1]["default"] == pack("core.karcher").MAX_NEWTON_STEPS


def test_merge_node_errors():
    node = pack("nodes.merge").GrassmannLoRAKarcherMerge()
    a = random_lora("sd1", rank=4, seed=0, limit=4)
    b = random_lora("sd1", rank=4, seed=1, limit=4)
    with pytest.raises(LoraError, match="connect at least one"):
        node.run(None, None, "karcher", 0, "", "fp16", 0.0, 0.0, 0.2, 0.5, 0)
    with pytest.raises(LoraError, match="1 number"):
        node.run(None, None, "karcher", 0, "1", "fp16", 0.0, 0.0, 0.2, 0.5, 0, lora_1=a, lora_2=b)
    with pytest.raises(LoraError, match="negative"):
        node.run(None, None, "karcher", 0, "1, -1", "fp16", 0.0, 0.0, 0.2, 0.5, 0, lora_1=a, lora_2=b)


def test_merge_node_rank_input_means_what_core_does():
    merge = pack("core.merge").merge
    node = pack("nodes.merge").GrassmannLoRAKarcherMerge()
    a = random_lora("sd1", rank=4, seed=0, limit=4, path="a.safetensors")
    b = random_lora("sd1", rank=6, seed=1, limit=4, path="b.safetensors")
    for method in ("linear", "concat"):          # exact: a rank left set for another method is ignored
        merged = node.run(None, None, method, 8, "", "fp32", 0.0, 0.0, 0.2, 0.5, 0,
                          lora_1=a, lora_2=b)["result"][2]
        ref = merge([a, b], None, method, None).lora
        assert {n: m.rank for n, m in merged.modules.items()} == {n: 10 for n in ref.modules}
        for name, mod in ref.modules.items():
            assert torch.equal(merged.modules[name].delta(), mod.delta())
    # rank 0 = core's default: per module the smallest source rank
    merged = node.run(None, None, "svd", 0, "", "fp32", 0.0, 0.0, 0.2, 0.5, 0, lora_1=a, lora_2=b)["result"][2]
    assert {m.rank for m in merged.modules.values()} == {4}
    merged = node.run(None, None, "svd", 5, "", "fp32", 0.0, 0.0, 0.2, 0.5, 0, lora_1=a, lora_2=b)["result"][2]
    assert {m.rank for m in merged.modules.values()} == {5}


class _FakeProgressBar:
    """comfy.utils.ProgressBar stand-in: records updates; raises like ComfyUI
    does on cancel once `cancel_at` updates have been made."""
    updates: list = []
    cancel_at: int | None = None

    def __init__(self, total):
        self.total = total

    def update_absolute(self, value, total=None):
        type(self).updates.append((value, total))
        if self.cancel_at is not None and len(self.updates) >= self.cancel_at:
            raise InterruptedError("cancelled by the user")


@pytest.fixture
def fake_comfy_progress(monkeypatch):
    import types
    comfy = types.ModuleType("comfy")
    comfy.utils = types.ModuleType("comfy.utils")
    comfy.utils.ProgressBar = _FakeProgressBar
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.utils", comfy.utils)
    _FakeProgressBar.updates, _FakeProgressBar.cancel_at = [], None
    return _FakeProgressBar


def test_merge_and_similarity_nodes_show_progress_per_module_and_stop_on_cancel(fake_comfy_progress):
    merge_node = pack("nodes.merge").GrassmannLoRAKarcherMerge()
    sim_node = pack("nodes.analysis").GrassmannLoRASimilarity()
    a = random_lora("sd1", rank=4, seed=0, limit=5, path="a.safetensors")
    b = perturbed_lora(a, 0.3, seed=1, path="b.safetensors")
    merge_node.run(None, None, "svd", 0, "", "fp16", 0.0, 0.0, 0.2, 0.5, 0, lora_1=a, lora_2=b)
    assert fake_comfy_progress.updates == [(i, 5) for i in range(1, 6)] + [(5, 5)]
    fake_comfy_progress.updates = []
    sim_node.run(a, b, "out", 0, "")
    assert fake_comfy_progress.updates == [(i, 7) for i in range(1, 8)]
    for run in (lambda: merge_node.run(None, None, "karcher", 0, "", "fp16", 0.0, 0.0, 0.2, 0.5, 0,
                                       lora_1=a, lora_2=b),
                lambda: sim_node.run(a, b, "out", 0, "")):
        fake_comfy_progress.updates, fake_comfy_progress.cancel_at = [], 2
        with pytest.raises(InterruptedError):
            run()
        assert len(fake_comfy_progress.updates) == 2     # stopped at the cancel, no work after it


# ----------------------------------------------------------------------------- Load cache

def test_load_cache_rereads_changed_files(tmp_path):
    lora_io = pack("nodes.lora_io")
    path = tmp_path / "x.safetensors"
    pack("core.save").save_kohya(random_lora("sd1", rank=2, seed=0, limit=3), str(path))
    first = lora_io.load_cached(str(path))
    assert lora_io.load_cached(str(path)) is first
    pack("core.save").save_kohya(random_lora("sd1", rank=2, seed=1, limit=3), str(path), overwrite=True)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    second = lora_io.load_cached(str(path))
    assert second is not first
    name = next(iter(first.modules))
    assert not torch.equal(first.modules[name].up, second.modules[name].up)


def test_apply_save_as_written_keeps_lokr_products_fp32():
    """'as stored' writes LoHa/LoKr products in fp32 (what `core convert` writes), plain LoRAs as stored."""
    lora = random_lora("sd1", rank=2, seed=0, limit=2, dtype=torch.float16)
    name = next(iter(lora.modules))
    lora.modules[name].kind = "lokr"
    written = common.as_written(lora, None)
    assert written.modules[name].dtype == torch.float32
    assert all(m.dtype == torch.float16 for n, m in written.modules.items() if n != name)
    assert common.as_written(lora, torch.float16) is lora


# ----------------------------------------------------------------------------- base-model check

# comfy.supported_models' class tree as far as the check relies on it (the real classes are
# checked in tests/integration/test_comfy_families.py): subclass -> base.
COMFY_MODEL_TREE = {
    "SD15": None, "SD20": None, "SDXL": None, "SDXLRefiner": None, "SD3": None, "Flux": None,
    "FluxSchnell": "Flux", "FluxInpaint": "Flux", "Flux2": "Flux", "Chroma": None, "ChromaRadiance": "Chroma",
    "QwenImage": None, "Lumina2": None, "ZImage": "Lumina2", "WAN21_T2V": None, "WAN22_T2V": "WAN21_T2V",
    "HiDream": None, "HunyuanVideo": None, "HunyuanVideo15": "HunyuanVideo", "LTXV": None, "LTXAV": "LTXV",
}


@pytest.fixture
def comfy_models(monkeypatch):
    """A stand-in comfy.supported_models; returns model(class name) -> a MODEL of that checkpoint class."""
    import types
    sm = types.ModuleType("comfy.supported_models")
    for name, base in COMFY_MODEL_TREE.items():
        setattr(sm, name, type(name, (getattr(sm, base),) if base else (), {}))
    comfy = types.ModuleType("comfy")
    comfy.supported_models = sm
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.supported_models", sm)
    return lambda name: types.SimpleNamespace(model=types.SimpleNamespace(model_config=getattr(sm, name)()))


def test_merge_onto_another_base_names_the_sources_and_the_checkpoint(monkeypatch, comfy_models):
    """Two SD2 LoRAs merged onto an SD1.5 checkpoint: refused before any merging,
    naming each source by input and file and the checkpoint's family (not the
    merge's own name, a file the user never made)."""
    model = comfy_models("SD15")
    a = random_lora("sd2", rank=4, seed=0, limit=3, path="/loras/style_sd2.safetensors")
    b = random_lora("sd2", rank=4, seed=1, limit=3, path="/loras/other_sd2.safetensors")
    node = pack("nodes.merge").GrassmannLoRAKarcherMerge()
    merged = []
    monkeypatch.setattr(pack("core.merge"), "merge", lambda *a, **k: merged.append(1))
    with pytest.raises(LoraError) as err:
        node.run(model, object(), "karcher", 0, "", "fp16", 1.0, 1.0, 0.2, 0.5, 0, lora_1=a, lora_3=b)
    text = str(err.value)
    assert "lora_1 style_sd2.safetensors (SD2.x), lora_3 other_sd2.safetensors (SD2.x)" in text
    assert "checkpoint, which is SD1.x" in text and "merged" not in text and not merged
    # one LoRA applied alone: the same message, in the singular
    with pytest.raises(LoraError, match=r"^style_sd2.safetensors \(SD2.x\) is made for another base"):
        pack("nodes.common").check_family(a, model)


def _family_lora(family: str, path: str = "/loras/x.safetensors"):
    """A LoRA the core read as ``family``, training one diffusion-model module of its table."""
    sdarch = pack("core.sdarch")
    shapes = sdarch.arch_for(family).shapes if family in sdarch.TABLE_FAMILIES else {"lora_unet_blocks_0_x": ()}
    lora = random_lora("sd1", rank=2, seed=0, limit=1, path=path)
    lora.modules = {next(n for n in shapes if n.startswith("lora_unet_")): next(iter(lora.modules.values()))}
    lora.family = family
    return lora


@pytest.mark.parametrize("checkpoint,own", [
    ("SD15", "sd1"), ("SDXL", "sdxl"), ("SD3", "sd3"), ("Flux", "flux"), ("FluxSchnell", "flux"),
    ("Flux2", "flux2"), ("Chroma", "flux"), ("ChromaRadiance", "flux"), ("QwenImage", "qwen_image"),
    ("ZImage", "z_image"), ("WAN22_T2V", "wan"), ("HiDream", "hidream"), ("HunyuanVideo", "hunyuan_video"),
    ("LTXV", "ltx")])
def test_checkpoint_refuses_a_lora_of_another_family(comfy_models, checkpoint, own):
    """Each checkpoint class takes its own family's LoRA (and one the core cannot
    place) and refuses another family's with a one-line error naming both."""
    model = comfy_models(checkpoint)
    common.check_family(_family_lora(own), model)
    common.check_family(_family_lora("unknown"), model)
    other = "flux" if own == "wan" else "wan"
    with pytest.raises(LoraError) as err:
        common.check_family(_family_lora(other, "/loras/other.safetensors"), model)
    label = "Chroma" if checkpoint.startswith("Chroma") else core.lora.FAMILY_LABELS[own]
    assert str(err.value) == (f"other.safetensors ({core.lora.FAMILY_LABELS[other]}) is made for another base "
                              f"model than the checkpoint, which is {label}; use LoRAs trained on {label}, "
                              f"or a checkpoint of their base")
    if own not in ("sd1", "sdxl"):  # an SDXL LoRA (UNet modules) on a DiT
        with pytest.raises(LoraError, match=r"^x.safetensors \(SDXL\) is made for another base model"):
            common.check_family(_family_lora("sdxl"), model)


@pytest.mark.parametrize("checkpoint", ["Lumina2", "HunyuanVideo15", "LTXAV"])
def test_unlisted_checkpoints_are_not_checked(comfy_models, checkpoint):
    """Lumina 2 (Z-Image's base), HunyuanVideo 1.5 and LTX-2 (built on HunyuanVideo /
    LTX-Video, other models): no check rather than a guess."""
    common.check_family(_family_lora("wan"), comfy_models(checkpoint))
    common.check_family(_family_lora("flux"), comfy_models(checkpoint))


def test_ambiguous_dit_loras_are_not_refused(comfy_models, tmp_path):
    """LoRAs whose files the core reads as another family, because nothing in them tells
    the two apart, are taken by their own checkpoint: read from files as trainers write them."""
    import re
    from core.formats import load_lora
    from core.sdarch import arch_for
    from tests import dit_files

    def read(family, variant, fmt, names):
        path = dit_files.write(dit_files.random_dit_lora(family, variant, names), family, variant, fmt,
                               tmp_path / f"{family}-{variant}-{fmt}.safetensors")
        return load_lora(path)

    def names(family, variant, pattern):
        return [n for n in arch_for(family, variant).shapes if re.search(pattern, n)]

    chroma = read("flux", "chroma", "kohya", dit_files.sample_names("flux", "chroma"))
    klein = read("flux2", "klein-4b", "kohya", names("flux2", "klein-4b", r"double_blocks_0_\w+_attn"))
    qwen = read("qwen_image", "base", "peft", names("qwen_image", "base", r"blocks_(0|18)_attn_"))
    clip_l = read("flux", "dev", "kohya", names("flux", "dev", r"^lora_te1_\w+layers_0_"))
    # HunyuanVideo's kohya double/single-block attention: Flux.1's names and widths
    hunyuan = read("flux", "dev", "kohya",
                   names("flux", "dev", r"double_blocks_0_img_attn_qkv|single_blocks_0_linear1"))
    # HunyuanVideo's diffusers double-block attention (20 blocks, 3072 wide): Qwen-Image's names and widths
    hunyuan_diffusers = read("qwen_image", "base", "peft", names("qwen_image", "base", r"blocks_(0|19)_attn_"))
    # diffusers MLPs only (transformer_blocks.4.ff): once taken for SDXL's deep blocks; with
    # diffusers' CLIP-L, SD1.x by the text encoder (no DiT table is fitted to ff.net names)
    mlp = read("flux", "dev", "peft", names("flux", "dev", r"double_blocks_4_img_mlp_0"))
    mlp_clip_l = read("flux", "dev", "peft",
                      names("flux", "dev", r"double_blocks_4_img_mlp_0|^lora_te1_\w+layers_0_"))
    assert ([l.family for l in (chroma, klein, qwen, clip_l, hunyuan, hunyuan_diffusers, mlp, mlp_clip_l)]
            == ["flux", "flux", "flux", "sdxl", "flux", "qwen_image", "unknown", "sd1"])
    for lora, checkpoint in ((chroma, "Chroma"), (chroma, "ChromaRadiance"), (klein, "Flux2"), (qwen, "QwenImage"),
                             (clip_l, "Flux"), (hunyuan, "HunyuanVideo"), (hunyuan_diffusers, "HunyuanVideo"),
                             (mlp, "Flux"), (mlp_clip_l, "Flux")):
        common.check_family(lora, comfy_models(checkpoint))
    # a text-encoder-only LoRA is still judged on an SD checkpoint, as before
    with pytest.raises(LoraError, match=r"\(SDXL\) is made for another base model .* which is SD1.x;"):
        common.check_family(clip_l, comfy_models("SD15"))
