"""Runs INSIDE ComfyUI's venv (cwd = COMFYUI_PATH): the pack's base-model check
(nodes/common.py) against ComfyUI's real checkpoint classes and LoRA apply path.

    python comfy_family_probe.py PACK_ROOT wan.safetensors flux.safetensors out.json

out.json: "classes": every comfy.supported_models class -> its base classes (MRO names)
and the check's (label, accepted families) or null; "table": the classes the check
names; "apply": the Grassmann Apply LoRA node on a Flux.1 model built on the meta
device with the Wan file (the error text) and the Flux file (the number of patched
weights).
"""
import importlib.util
import inspect
import json
import os
import sys
import types

PACK_ROOT, WAN, FLUX, OUT = sys.argv[1:5]
sys.argv = sys.argv[:1] + ["unused-job", "unused-out"]
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfy_keymap_probe as keymaps  # noqa: E402  (ComfyUI's argument parsing; its Flux.1 config)
import torch  # noqa: E402

import comfy.model_detection  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.supported_models as sm  # noqa: E402

spec = importlib.util.spec_from_file_location("grassmann_lora", os.path.join(PACK_ROOT, "__init__.py"),
                                              submodule_search_locations=[PACK_ROOT])
pack = importlib.util.module_from_spec(spec)
sys.modules["grassmann_lora"] = pack
spec.loader.exec_module(pack)
common = sys.modules["grassmann_lora.nodes.common"]
load_lora = importlib.import_module("grassmann_lora.core.formats").load_lora
Apply = importlib.import_module("grassmann_lora.nodes.lora_io").GrassmannLoRAApply


def as_model(config):
    return types.SimpleNamespace(model=types.SimpleNamespace(model_config=config))


classes = {}
for name, cls in inspect.getmembers(sm, inspect.isclass):
    if cls.__module__ == sm.__name__:
        rule = common.checkpoint_families(as_model(object.__new__(cls)))  # no __init__: no weights needed
        classes[name] = {"mro": [c.__name__ for c in cls.__mro__], "rule": rule and [rule[0], list(rule[1])]}

apply = {}
with torch.no_grad():
    config = comfy.model_detection.model_config_from_unet_config(dict(keymaps.CONFIGS["flux/dev"][0]))
    model = config.get_model({}, "", device=torch.device("meta"))
    patcher = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    for key, path in (("wan", WAN), ("flux", FLUX)):
        try:
            out, _ = Apply().run(patcher, None, load_lora(path), 1.0, 0.0, "as stored")
            apply[key] = len(out.patches)
        except Exception as e:  # noqa: BLE001 - the test reads what was raised
            apply[key] = f"{type(e).__name__}: {e}"
with open(OUT, "w") as fh:
    json.dump({"classes": classes, "table": list(common.CHECKPOINT_FAMILIES), "apply": apply,
               "model_config": type(config).__name__}, fh)
