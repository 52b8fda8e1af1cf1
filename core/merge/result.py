"""The merged LoRA as returned and saved: the file's key naming and the recipe
(method, weights, parameters, source hashes, fidelity) written into its metadata."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import torch

from .. import __version__
from ..errors import LoraError
from ..lora import LoraFile
from ..save import save_kohya
from ..sdarch import DIT_FAMILIES
from .report import MergeReport

NAMINGS = ("first", "kohya")
RECIPE_KEY = "grassmann_lora.merge"
KOHYA_LIKE = ("kohya", "lycoris", "lycoris-loha", "lycoris-lokr")  # key stems are module names


@dataclass
class MergeResult:
    lora: LoraFile
    report: MergeReport
    key_names: dict[str, str] = field(default_factory=dict)  # canonical -> written stem ("first" naming)

    @property
    def recipe(self) -> dict:
        return json.loads(self.lora.metadata[RECIPE_KEY])

    def save(self, path: str, dtype: torch.dtype | None = None, overwrite: bool = False,
             numbered: bool = False) -> str:
        """Write a kohya-style .safetensors through core.save.save_kohya (the
        one LoRA writer: atomic, no overwrite unless asked, finite values only)
        with kohya metadata plus the recipe; keys follow the chosen naming."""
        if not self.lora.modules:
            raise LoraError("nothing to save: the merge has no modules", path)
        return save_kohya(self.lora, path, dtype, overwrite, self.lora.metadata, self.key_names or None,
                          numbered)


def first_naming(first: LoraFile, out: LoraFile) -> dict[str, str]:
    """canonical name -> key stem the first source used, for kohya-like files.
    DiT families keep the LDM names: their trainers' spellings name split parts
    (OneTrainer's …_attn_to_k of a fused qkv), scale/shift-swapped layers, or
    keys ComfyUI does not map (musubi's Z-Image …_attention_to_out_0)."""
    if first.format not in KOHYA_LIKE or first.family in DIT_FAMILIES:
        return {}
    stems = {}
    for name in out.modules:
        m = first.modules.get(name)
        if m is not None and m.source_keys:
            stems[name] = m.source_keys[0].split(".", 1)[0]
    return stems


def file_sha256(path: str) -> str | None:
    if not path or not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()



def recipe(loras: list[LoraFile], report: MergeReport, params: dict) -> dict:
    """What the file's metadata records of its making; params: the method's checked parameters."""
    s = report.summary()
    out = {"tool": f"grassmann-lora {__version__}", "method": report.method, "weights": report.weights,
           "rank": report.rank, "sources": [{"name": lora.name, "sha256": file_sha256(lora.path)} for lora in loras],
           "fidelity": {k: s[k] for k in ("rel_error", "rel_error_max", "kept", "phi", "status", "skipped")}}
    out.update(params)
    if "karcher" in s:
        out["fidelity"]["karcher"] = s["karcher"]
    return out
