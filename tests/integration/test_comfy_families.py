"""The Apply/Merge nodes' base-model check (nodes/common.py CHECKPOINT_FAMILIES)
against a real ComfyUI (its venv, COMFYUI_PATH; tests/integration/comfy_family_probe.py):

* every class the table names exists, and the class tree the unit tests fake
  (tests/test_nodes_unit.py COMFY_MODEL_TREE) is ComfyUI's;
* each real checkpoint class, subclasses included, gets the rule meant for it;
* the Apply LoRA node refuses a Wan LoRA on a Flux.1 model (built on the meta
  device) with the one-line error, and patches a Flux.1 LoRA onto it.

Skipped with the reason when no ComfyUI is laid out.
"""
import json
import re
import subprocess
from pathlib import Path

import pytest

from core.sdarch import arch_for
from tests import dit_files
from tests.integration.comfy_harness import comfyui_path, comfyui_python
from tests.test_nodes_unit import COMFY_MODEL_TREE

pytestmark = pytest.mark.comfyui

PROBE = Path(__file__).with_name("comfy_family_probe.py")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("comfy_families")
    files = []
    for family, variant in (("wan", "14b"), ("flux", "dev")):
        names = [n for n in arch_for(family, variant).shapes if re.search(r"blocks_0_", n)]
        lora = dit_files.random_dit_lora(family, variant, names)
        files.append(dit_files.write(lora, family, variant, "kohya", tmp / f"{family}-lora.safetensors"))
    out = tmp / "out.json"
    run = subprocess.run([str(comfyui_python()), str(PROBE), str(ROOT), *files, str(out)], cwd=comfyui_path(),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


def test_table_names_comfyuis_classes_and_the_faked_tree_is_real(probe):
    classes = probe["classes"]
    assert set(probe["table"]) <= set(classes), set(probe["table"]) - set(classes)
    for name in COMFY_MODEL_TREE:
        fake, base = [name], COMFY_MODEL_TREE[name]
        while base:
            fake, base = fake + [base], COMFY_MODEL_TREE[base]
        assert [c for c in classes[name]["mro"] if c in COMFY_MODEL_TREE] == fake, name


def test_each_real_checkpoint_class_gets_its_rule(probe):
    rules = {name: info["rule"] for name, info in probe["classes"].items()}
    wan = [n for n in rules if n.startswith("WAN")]
    assert len(wan) >= 10 and all(rules[n] == ["Wan 2.x", ["wan"]] for n in wan), {n: rules[n] for n in wan}
    assert rules["Flux"] == rules["FluxSchnell"] == rules["FluxInpaint"] == ["Flux.1", ["flux"]]
    assert rules["Flux2"] == ["Flux.2", ["flux2", "flux"]]
    assert rules["Chroma"] == rules["ChromaRadiance"] == ["Chroma", ["flux"]]
    assert rules["ZImage"] == rules["ZImagePixelSpace"] == ["Z-Image", ["z_image"]]
    hunyuan = ["HunyuanVideo", ["hunyuan_video", "flux", "qwen_image"]]
    assert rules["HunyuanVideo"] == rules["HunyuanVideoI2V"] == rules["HunyuanVideoSkyreelsI2V"] == hunyuan
    assert rules["SD21UnclipL"] == ["SD2.x", ["sd2"]] and rules["SSD1B"] == ["SDXL", ["sdxl"]]
    for unchecked in ("Lumina2", "HunyuanImage21", "HunyuanVideo15", "LTXAV", "HiDreamO1", "HunyuanDiT"):
        assert rules[unchecked] is None, unchecked


def test_apply_node_refuses_a_wan_lora_on_flux_and_patches_a_flux_one(probe):
    assert probe["model_config"] == "Flux"
    assert probe["apply"]["wan"] == (
        "LoraError: wan-lora.safetensors (Wan 2.x) is made for another base model than the checkpoint, "
        "which is Flux.1; use LoRAs trained on Flux.1, or a checkpoint of their base")
    assert isinstance(probe["apply"]["flux"], int) and probe["apply"]["flux"] > 0
