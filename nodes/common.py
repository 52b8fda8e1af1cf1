"""Shared pieces of the node adapters.

Importing this module needs neither ComfyUI nor anything heavier than torch:
``comfy`` and ``folder_paths`` are imported inside the functions that need
them, so ``tests/test_nodes_unit.py`` can import every node class without a
ComfyUI, and ``/object_info`` stays cheap.
"""
from __future__ import annotations

import os
import re
import uuid

CATEGORY = "Grassmann LoRA"
LORA_TYPE = "LORA_FACTORS"          # a core.lora.LoraFile travelling between our nodes
MAX_LORAS = 16                      # optional lora_1 … lora_16; the web extension shows them one by one
TABLE_UI_KEY = "grassmann_table"    # ui key the web extension renders as a table on the node
DTYPE_CHOICES = ["fp16", "bf16", "fp32"]
AS_STORED = "as stored"


def lora_slot_name(k: int) -> str:
    return f"lora_{k}"


def lora_slot_inputs(what: str) -> dict:
    """Optional inputs lora_1 … lora_MAX_LORAS. The web extension keeps exactly one
    unconnected slot visible and adds the next one when it gets connected."""
    return {lora_slot_name(k): (LORA_TYPE, {"tooltip": f"LoRA #{k} {what}. Connect one and the next "
                                                       f"slot appears (up to {MAX_LORAS})."})
            for k in range(1, MAX_LORAS + 1)}


def connected_loras(inputs: dict) -> list[tuple[str, object]]:
    """(slot name, LoraFile) of the connected lora_k inputs, in slot order."""
    found = []
    for key, value in inputs.items():
        m = re.fullmatch(r"lora_(\d+)", key)
        if m and value is not None:
            found.append((int(m.group(1)), key, value))
    return [(key, value) for _, key, value in sorted(found, key=lambda t: t[0])]


def lora_labels(loras) -> list[str]:
    """Short unique display names (file names without extension; '#k' suffix on clashes)."""
    names = [os.path.splitext(os.path.basename(getattr(l, "path", "") or "lora"))[0] or "lora"
             for l in loras]
    out, seen = [], {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if names.count(n) == 1 else f"{n} #{seen[n]}")
    return out


def parse_weights(text: str, n: int) -> list[float] | None:
    """Comma/space-separated numbers, one per connected LoRA; None when empty
    (core.merge then uses equal weights 1/n, the average)."""
    from ..core.errors import LoraError

    parts = [p for p in re.split(r"[,\s;]+", (text or "").strip()) if p]
    if not parts:
        return None
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise LoraError(f"weights {text!r}: expected numbers separated by commas") from None
    if len(weights) != n:
        raise LoraError(f"weights {text!r}: {len(weights)} number(s) for {n} connected LoRA(s); "
                        "give one per LoRA or leave the field empty for equal weights")
    return weights


def as_written(lora, dtype):
    """The LoRA as Save LoRA / `python -m core convert` write it: with no dtype
    asked, LoHa/LoKr factors (products of stored numbers) are kept in fp32."""
    from ..core.conversion import kohya_ready
    return kohya_ready(lora, dtype)


def save_dtype(choice: str):
    """Torch dtype for a dtype choice; None for 'as stored' (each module keeps its own)."""
    from ..core.save import DTYPES
    return None if choice == AS_STORED else DTYPES[choice]


# ----------------------------------------------------------------------------- ComfyUI glue

class Progress:
    """comfy.utils.ProgressBar when running inside ComfyUI (its updates also raise
    if the user pressed cancel), a no-op outside it."""

    def __init__(self, total: int):
        self.total = max(int(total), 1)
        try:
            import comfy.utils
            self.bar = comfy.utils.ProgressBar(self.total)
        except ImportError:
            self.bar = None

    def __call__(self, done: int, total: int | None = None) -> None:
        if total is not None:
            self.total = max(int(total), 1)
        if self.bar is not None:
            self.bar.update_absolute(min(int(done), self.total), self.total)


def pil_to_image(*images):
    """PIL images → ComfyUI IMAGE tensor (B, H, W, 3) float32 in [0, 1].
    Images of different sizes are padded with white to the largest one."""
    import numpy as np
    import torch

    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    h = max(a.shape[0] for a in arrays)
    w = max(a.shape[1] for a in arrays)
    batch = np.ones((len(arrays), h, w, 3), dtype=np.float32)
    for i, a in enumerate(arrays):
        batch[i, :a.shape[0], :a.shape[1]] = a
    return torch.from_numpy(batch)


def preview_ui(*images, prefix: str = "grassmann") -> list[dict]:
    """Write PNG previews into ComfyUI's temp folder and describe them the way
    PreviewImage does, so the front end shows them on the node. Outside ComfyUI
    (unit tests) there is no temp folder to serve from: returns []."""
    try:
        import folder_paths
    except ImportError:
        return []
    from ..core.plot import image_to_png

    folder = folder_paths.get_temp_directory()
    out = []
    for im in images:
        name = f"{prefix}_{uuid.uuid4().hex[:12]}.png"
        image_to_png(im, os.path.join(folder, name))
        out.append({"filename": name, "subfolder": "", "type": "temp"})
    return out


def table(title: str, columns: list[str], rows: list[list], note: str = "") -> dict:
    """One table for the web extension: {"title", "columns", "rows", "note"}."""
    return {"title": title, "columns": [str(c) for c in columns],
            "rows": [[("" if v is None else str(v)) for v in r] for r in rows], "note": note}


def notes_block(title: str, lines: list[str]) -> dict:
    """Lines of prose (warnings) the web extension shows as wrapped paragraphs."""
    return {"title": title, "lines": [str(line) for line in lines]}


def node_result(result: tuple, tables: list[dict] = (), text: str | None = None,
                images: list[dict] = ()) -> dict:
    ui = {}
    if tables:
        ui[TABLE_UI_KEY] = list(tables)
    if text is not None:
        ui["text"] = [text]
    if images:
        ui["images"] = list(images)
    return {"ui": ui, "result": result} if ui else {"result": result}


# The LoRA families each ComfyUI checkpoint class accepts (comfy.supported_models class
# names; the most derived class listed decides, so Flux2 overrides Flux and WAN22_T2V
# inherits WAN21_T2V; classes not listed, or listed as None, are not checked). A false
# refusal is worse than no check, so a checkpoint also accepts the family the core
# reads its own LoRAs as where their files cannot tell the two apart:
CHECKPOINT_FAMILIES: dict[str, tuple[str, ...] | None] = {
    "SD15": ("sd1",), "SD20": ("sd2",), "SDXL": ("sdxl",), "SDXLRefiner": ("sdxl",),
    "SD3": ("sd3",),
    "Flux": ("flux",),                          # and FluxInpaint, FluxSchnell
    "Flux2": ("flux2", "flux"),                 # a Klein LoRA with double blocks only fits Flux.1's table too
    "Chroma": ("flux",),                        # Chroma is a variant of the Flux.1 table (ChromaRadiance too)
    "QwenImage": ("qwen_image", "flux"),        # diffusers attention in blocks < 19 only fits Flux.1's table too
    "ZImage": ("z_image",),                     # not Lumina2, its base, whose LoRAs read as Z-Image
    "WAN21_T2V": ("wan",),                      # every Wan 2.1/2.2 model subclasses it
    "HiDream": ("hidream",),
    # kohya double/single blocks are Flux.1's names and widths; diffusers double-block
    # attention alone (transformer_blocks.0-19.attn) fits Qwen-Image's table
    "HunyuanVideo": ("hunyuan_video", "flux", "qwen_image"),
    # other models built on HunyuanVideo / LTX-Video, whose LoRAs the core has no table for
    "HunyuanImage21": None, "HunyuanImage21Refiner": None, "HunyuanVideo15": None,
    "HunyuanVideo15_SR_Distilled": None, "LTXAV": None,
    "LTXV": ("ltx",),
}
CHECKPOINT_LABELS = {"Chroma": "Chroma"}        # else the label of the first accepted family
SD_FAMILIES = ("sd1", "sd2", "sdxl")


def checkpoint_families(model) -> tuple[str, tuple[str, ...]] | None:
    """(label, accepted LoRA families) of a ComfyUI MODEL's checkpoint class, or
    None when it is not checked (or no ComfyUI)."""
    from ..core.lora import FAMILY_LABELS
    try:
        import comfy.supported_models as sm
    except ImportError:
        return None
    config = getattr(getattr(model, "model", None), "model_config", None)
    if config is None:
        return None
    listed = {getattr(sm, name, None): name for name in CHECKPOINT_FAMILIES}  # a class this ComfyUI lacks: absent
    for cls in type(config).__mro__:
        name = listed.get(cls)
        if name is not None:
            accepted = CHECKPOINT_FAMILIES[name]
            if accepted is None:
                return None
            return CHECKPOINT_LABELS.get(name, FAMILY_LABELS[accepted[0]]), accepted
    return None


def _refused(lora, accepted: tuple[str, ...]) -> bool:
    """A LoRA of a known family the checkpoint does not accept. On a DiT checkpoint, only
    one that trains a diffusion-model module of its family's own table: text encoders
    (CLIP-L, T5, Qwen3) are shared across bases, and a DiT file read as SD1/SD2/SDXL by a
    text encoder's width (a Flux.1 CLIP-L LoRA, with diffusers MLPs or not) has no UNet module."""
    from ..core.lora import module_part
    from ..core.sdarch import TABLE_FAMILIES, arch_for
    family = getattr(lora, "family", "unknown")
    if family == "unknown" or family in accepted:
        return False
    if accepted[0] in SD_FAMILIES:
        return True
    table = arch_for(family).shapes if family in TABLE_FAMILIES else None  # HunyuanVideo, LTX: by names
    return any(module_part(n) == "unet" and (table is None or n in table) for n in lora.modules)


def check_family(lora, model) -> None:
    check_families([(None, lora)], model)


def check_families(named, model) -> None:
    """Refuse LoRAs made for another base than MODEL's, before any work: the
    error names each such LoRA (input and file) and the checkpoint's family.
    ``named``: (input name or None, LoraFile) pairs."""
    from ..core.errors import LoraError
    from ..core.lora import FAMILY_LABELS

    rule = checkpoint_families(model) if model is not None else None
    if rule is None:
        return
    label, accepted = rule
    wrong = [(slot, lora) for slot, lora in named if _refused(lora, accepted)]
    if not wrong:
        return
    who = ", ".join(f"{slot + ' ' if slot else ''}{os.path.basename(lora.path or '') or 'LoRA'} "
                    f"({FAMILY_LABELS.get(lora.family, lora.family)})" for slot, lora in wrong)
    raise LoraError(f"{who} {'is' if len(wrong) == 1 else 'are'} made for another base model than the "
                    f"checkpoint, which is {label}; use LoRAs trained on "
                    f"{label}, or a checkpoint of their base")


def apply_lora(model, clip, lora, strength_model: float, strength_clip: float, dtype=None):
    """Patch MODEL/CLIP exactly as stock LoraLoader would with the kohya file that
    ``core.save.save_kohya(lora, dtype=dtype)`` writes: the same tensors (same
    dtype cast) through ``comfy.sd.load_lora_for_models``, which clones the
    patchers, so the inputs are never modified."""
    if strength_model == 0 and strength_clip == 0:   # LoraLoader's own shortcut
        return model, clip
    import comfy.sd
    from ..core.save import kohya_tensors

    check_family(lora, model)
    tensors = kohya_tensors(as_written(lora, dtype), dtype)
    return comfy.sd.load_lora_for_models(model, clip, tensors, strength_model, strength_clip)
