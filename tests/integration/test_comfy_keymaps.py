"""The DiT tables and the files the pack writes, against ComfyUI's own key maps.

For every family/variant in core.arch, ComfyUI (its venv, COMFYUI_PATH) builds
the model at full depth on the meta device (tests/integration/
comfy_keymap_probe.py) and reports ``model_lora_keys_unet`` /
``model_lora_keys_clip`` and its weight shapes. Checked here:

* the table is the model: the same set of 2-D diffusion-model weights, same shapes;
* every module the pack writes (kohya ``lora_unet_<LDM>`` / ``lora_te*_``) maps,
  and ComfyUI loads the written file with no "lora key not loaded";
* ComfyUI's diffusers map (``transformer.<diffusers key>``, with row offsets for
  split modules) names the same module and rows as the table's aliases/splits;
* ComfyUI's ``calculate_weight`` on a zero weight gives the ΔW the core read,
  for the written file and for a diffusers file of split parts (fused slices).

Skipped with the reason when no ComfyUI is laid out.
"""
import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core import arch as dit
from core.arch import written_name
from core.formats import load_lora
from core.formats.names import resolve_module
from core.merge import merge
from core.save import save_kohya
from core.sdarch import arch_for
from tests import dit_files
from tests.integration.comfy_harness import comfyui_path, comfyui_python

pytestmark = pytest.mark.comfyui

PROBE = Path(__file__).with_name("comfy_keymap_probe.py")
CONFIGS = [f"{f}/{v}" for f in dit.FAMILY_MODULES for v in dit.variants(f)]
# Files written and loaded by ComfyUI: the first variant of each family (variants share
# their naming) and Chroma (its own modules), each with ΔW through ComfyUI's patching
# (zero weights of full size) for one module of every shape. Tables and maps: every variant.
FILE_CONFIGS = [c for c in CONFIGS if c.split("/")[1] == dit.variants(c.split("/")[0])[0]] + ["flux/chroma"]
COLS = 8


def _checked(table, names):
    """One module per (shape, whole/split) kind: every kind of weight gets a ΔW check."""
    seen, out = set(), []
    for n in names:
        kind = (table.shapes[n], n in table.split_parts, n.split("_")[1])
        if kind not in seen:
            seen.add(kind)
            out.append(n)
    return out


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("comfy_keymaps")
    files, sources = [], {}
    for config in FILE_CONFIGS:
        family, variant = config.split("/")
        table = arch_for(family, variant)
        src = dit_files.random_dit_lora(family, variant, list(table.shapes), rank=1, seed=len(sources))
        written = save_kohya(src, str(tmp / f"{family}-{variant}-pack.safetensors"))
        # ComfyUI maps diffusers-named transformer modules (not diffusers' T5): the DiT alone
        unet = dit_files.random_dit_lora(family, variant, [n for n in table.shapes if n.startswith("lora_unet_")],
                                         rank=1, seed=len(sources))
        diffusers = dit_files.write(unet, family, variant, "peft", tmp / f"{family}-{variant}-peft.safetensors")
        # (the probe looks modules up by kohya name: Wan's UMT5, written under ComfyUI's own path, is left out)
        check = [n for n in _checked(table, list(table.shapes)) if written_name(family, n) == n]
        sources[config] = (table, written, diffusers, check)
        files.append({"config": config, "path": str(written), "check": check, "cols": COLS})
        files.append({"config": config, "path": str(diffusers), "cols": COLS,
                      "check": [n for n in check if n.startswith("lora_unet_")]})
    # a merge led by a split-layout file (OneTrainer's lora_transformer_…_to_q): written with LDM names
    names = _checked(arch_for("flux", "dev"), [n for n in arch_for("flux", "dev").shapes if n.startswith("lora_unet_")])
    led = [load_lora(dit_files.write(dit_files.random_dit_lora("flux", "dev", names, rank=1, seed=k), "flux", "dev", fmt,
                                     tmp / f"merge-{fmt}.safetensors")) for k, fmt in enumerate(("onetrainer", "kohya"))]
    merged = merge(led, [1.0, 1.0], method="concat").save(str(tmp / "merged.safetensors"))
    sources["merged"] = merged
    files.append({"config": "flux/dev", "path": merged, "check": names, "cols": COLS})
    job = tmp / "job.json"
    job.write_text(json.dumps({"configs": CONFIGS, "files": files}))
    run = subprocess.run([str(comfyui_python()), str(PROBE), str(job), str(tmp)], cwd=comfyui_path(),
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp / "result.json").read_text())
    return result, sources, files, tmp


def _config(probe, config):
    info = probe[0]["configs"][config]
    if "missing" in info:
        pytest.skip(info["missing"])
    return info


def _ldm(table, name):
    return dit_files.spellings(table.family, table.variant)[name][0]


@pytest.mark.parametrize("config", CONFIGS)
def test_table_is_comfyuis_model(probe, config):
    info = _config(probe, config)
    family, variant = config.split("/")
    table = arch_for(family, variant)
    ours = {f"diffusion_model.{_ldm(table, n)}.weight": math.prod(s) for n, s in table.shapes.items()
            if n.startswith("lora_unet_")}
    # every weight of 2 dims or more: linears, convs, Wan's Conv3d patch embedding (ComfyUI patches it too)
    theirs = {k: math.prod(s) for k, s in info["unet_weights"].items()}
    assert sorted(set(theirs) - set(ours)) == [] and sorted(set(ours) - set(theirs)) == []
    assert {k: v for k, v in ours.items() if theirs[k] != v} == {}


@pytest.mark.parametrize("config", FILE_CONFIGS)
def test_every_written_key_maps(probe, config):
    info = _config(probe, config)
    table, written, _, _ = probe[1][config]
    key_map = {**info["unet_map"], **info.get("clip_map", {})}
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0]
             for k in load_file(written)}
    stems = {written_name(table.family, n): n for n in table.shapes}
    assert names == set(stems)
    unmapped = sorted(n for n in names if n not in key_map)
    assert unmapped == [], f"{len(unmapped)} written modules ComfyUI does not map: {unmapped[:5]}"
    weights = {**info["unet_weights"], **info.get("clip_weights", {})}
    for n in names:
        target = key_map[n]
        assert isinstance(target, str) and math.prod(weights[target]) == math.prod(table.shapes[stems[n]]), n
    for f, res in zip(probe[2], probe[0]["files"]):
        if f["path"] == written:
            assert res["not_loaded"] == []


@pytest.mark.parametrize("config", CONFIGS)
def test_text_encoder_tables_map(probe, config):
    """Every variant's text-encoder modules, named as the pack writes them, map
    in ComfyUI's model_lora_keys_clip to a weight of the table's size."""
    info = _config(probe, config)
    family, variant = config.split("/")
    table = arch_for(family, variant)
    clip_map, weights = info.get("clip_map", {}), info.get("clip_weights", {})
    te = [n for n in table.shapes if not n.startswith("lora_unet_")]
    unmapped = [n for n in te if not isinstance(clip_map.get(written_name(family, n)), str)]
    assert unmapped == [], f"{len(unmapped)} of {len(te)} unmapped: {unmapped[:3]}"
    wrong = [n for n in te if math.prod(weights[clip_map[written_name(family, n)]]) != math.prod(table.shapes[n])]
    assert wrong == []


@pytest.mark.parametrize("config", CONFIGS)
def test_diffusers_aliases_agree_with_comfyui(probe, config):
    info = _config(probe, config)
    family, variant = config.split("/")
    table = arch_for(family, variant)
    unet_map = info["unet_map"]
    known = 0
    for name, aliases in dit_files.spellings(table.family, table.variant).items():
        if not name.startswith("lora_unet_"):
            continue
        target = f"diffusion_model.{aliases[0]}.weight"
        for alias in aliases[1:]:
            mapped = unet_map.get(f"transformer.{alias}")
            if mapped is not None:
                known += 1
                assert (mapped if isinstance(mapped, str) else mapped[0]) == target, alias
    for name, parts in table.split_parts.items():
        target = f"diffusion_model.{_ldm(table, name)}.weight"
        for alias, start, end, first in parts:
            mapped = unet_map.get(f"transformer.{alias}") or unet_map.get(f"diffusion_model.{alias}") \
                or unet_map.get(alias)
            if mapped is None:
                continue
            known += 1
            assert mapped[0] == target, alias
            if mapped[1] is not None:  # row offset (dim, start, size)
                assert mapped[1] == [0, start, end - start] and first == 0, alias
            else:  # a whole-weight function: the scale/shift swap
                assert mapped[2] == "swap_scale_shift", alias


@pytest.mark.parametrize("config", FILE_CONFIGS)
@pytest.mark.parametrize("which", ["written", "diffusers"])
def test_comfyui_patch_equals_core_delta(probe, config, which):
    info = _config(probe, config)
    table, written, diffusers, _ = probe[1][config]
    path = written if which == "written" else diffusers
    index = next(i for i, f in enumerate(probe[2]) if f["path"] == str(path))
    theirs = load_file(str(probe[3] / f"file{index}.safetensors"))
    lora = load_lora(str(path))
    not_loaded = probe[0]["files"][index]["not_loaded"]
    if which == "written":
        assert not_loaded == []
    # a diffusers file: ComfyUI leaves only what its diffusers map lacks (e.g. Chroma's
    # approximator, Flux.2's shared modulation, any diffusers-named Wan module)
    skipped = set()
    for key in not_loaded:
        stem = key.rsplit(".lora_", 1)[0]
        assert stem not in info["unet_map"], key
        skipped.add(resolve_module(stem, table.family, table.variant)[0])
    check = [n for n in probe[2][index]["check"] if n not in skipped]
    if not check:
        pytest.skip("ComfyUI maps none of the checked modules in this layout")
    assert set(theirs) >= set(check)
    for name in check:
        m = lora.modules[name]
        ours = m.scale * m.up.double() @ m.down.double()[:, :COLS]
        torch.testing.assert_close(theirs[name].double(), ours, rtol=1e-4, atol=1e-9, msg=name)


def test_merge_led_by_a_split_file_loads_whole(probe):
    """Every key of a merge whose first source spells Flux the OneTrainer way
    (split q/k/v, swapped norm_out) loads in ComfyUI, and its ΔW is the core's."""
    _config(probe, "flux/dev")
    path = probe[1]["merged"]
    index = next(i for i, f in enumerate(probe[2]) if f["path"] == path)
    assert probe[0]["files"][index]["not_loaded"] == []
    theirs = load_file(str(probe[3] / f"file{index}.safetensors"))
    lora = load_lora(path)
    assert set(theirs) == set(probe[2][index]["check"]) == set(lora.modules)
    for name, m in lora.modules.items():
        ours = m.scale * m.up.double() @ m.down.double()[:, :COLS]
        torch.testing.assert_close(theirs[name].double(), ours, rtol=1e-4, atol=1e-9, msg=name)
