"""Load, apply and save LoRAs as LORA_FACTORS (a core.lora.LoraFile)."""
from __future__ import annotations

import os
import threading
from collections import OrderedDict

from .common import (AS_STORED, CATEGORY, DTYPE_CHOICES, LORA_TYPE, apply_lora, as_written, node_result,
                     save_dtype, table)

# Parsed files by real path, keyed on (mtime_ns, size): a changed file is re-read.
_CACHE: "OrderedDict[str, tuple[tuple[int, int], object]]" = OrderedDict()
_CACHE_SIZE = 32
_CACHE_LOCK = threading.Lock()


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


def load_cached(path: str):
    """core.formats.load_lora with a small LRU cache by path + mtime + size.
    The LoraFile is shared between nodes: nothing may modify it."""
    from ..core.formats import load_lora

    real = os.path.realpath(path)
    stamp = _stamp(real)
    with _CACHE_LOCK:
        hit = _CACHE.get(real)
        if hit is not None and hit[0] == stamp:
            _CACHE.move_to_end(real)
            return hit[1]
    lora = load_lora(path)
    with _CACHE_LOCK:
        _CACHE[real] = (stamp, lora)
        _CACHE.move_to_end(real)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return lora


def lora_info_table(lora) -> dict:
    parts = ", ".join(f"{k} {v}" for k, v in sorted(lora.parts().items()))
    ranks = lora.ranks()
    rows = [["file", lora.name], ["format", lora.format], ["base", lora.family_label],
            ["modules", f"{len(lora.modules)} ({parts})"],
            ["rank", ", ".join(map(str, ranks)) if len(ranks) <= 6 else f"{ranks[0]}…{ranks[-1]}"]]
    alphas = lora.alphas()
    if alphas:
        rows.append(["alpha", ", ".join(f"{a:g}" for a in alphas[:6]) + ("…" if len(alphas) > 6 else "")])
    if lora.extras:
        rows.append(["ignored tensors", str(len(lora.extras))])
    for w in lora.warnings[:8]:
        rows.append(["warning", w])
    return table("LoRA", ["", ""], rows)


def _lora_names() -> list[str]:
    """ComfyUI's loras list; empty outside ComfyUI (so the class can be inspected in unit tests)."""
    try:
        import folder_paths
    except ImportError:
        return []
    return folder_paths.get_filename_list("loras")


class GrassmannLoRALoad:
    DESCRIPTION = ("Reads a LoRA from the loras folder (kohya, diffusers, PEFT, ComfyUI, cloneofsimo, "
                   "LyCORIS LoHa/LoKr) into exact low-rank factors for the other Grassmann LoRA nodes.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = (LORA_TYPE,)
    RETURN_NAMES = ("lora",)
    OUTPUT_TOOLTIPS = ("The parsed LoRA (factors, base model family, metadata).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora_name": (_lora_names(),
                          {"tooltip": "A LoRA file in ComfyUI's loras folder."}),
        }}

    @classmethod
    def IS_CHANGED(cls, lora_name):
        import folder_paths
        path = folder_paths.get_full_path("loras", lora_name)
        if not path or not os.path.exists(path):
            return ""
        return "%d:%d" % _stamp(path)

    def run(self, lora_name):
        import folder_paths
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        lora = load_cached(path)
        return node_result((lora,), tables=[lora_info_table(lora)])


class GrassmannLoRAApply:
    DESCRIPTION = ("Applies a LORA_FACTORS to MODEL and CLIP through ComfyUI's own LoRA patching, "
                   "exactly as LoraLoader would apply the same LoRA saved as a kohya file.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The patched diffusion model (a clone; the input is unchanged).",
                       "The patched text encoder (a clone; the input is unchanged).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model to patch."}),
            "clip": ("CLIP", {"tooltip": "The text encoder to patch."}),
            "lora": (LORA_TYPE, {"tooltip": "The LoRA to apply (from Load LoRA or a merge)."}),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                         "tooltip": "How strongly to modify the diffusion model; may be negative."}),
            "strength_clip": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                        "tooltip": "How strongly to modify the text encoder; may be negative."}),
            "dtype": ([AS_STORED] + DTYPE_CHOICES, {
                "default": AS_STORED,
                "tooltip": "Precision of the factors handed to ComfyUI: 'as stored' keeps each module's own "
                           "(what LoraLoader would read from the saved file)."}),
        }}

    def run(self, model, clip, lora, strength_model, strength_clip, dtype):
        return apply_lora(model, clip, lora, strength_model, strength_clip, save_dtype(dtype))


class GrassmannLoRASave:
    DESCRIPTION = ("Writes a LORA_FACTORS into the loras folder as a kohya .safetensors file (with its "
                   "metadata and merge recipe) that stock LoraLoader and other tools load.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("lora_name",)
    OUTPUT_TOOLTIPS = ("The saved file's name as LoraLoader lists it.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora": (LORA_TYPE, {"tooltip": "The LoRA to save (usually a merge)."}),
            "filename": ("STRING", {"default": "grassmann_merge.safetensors",
                                    "tooltip": "File name inside the first loras folder (subfolders allowed, "
                                               "no '..' or absolute paths); .safetensors is added if missing. "
                                               "Numbered like Save Image (name_00001.safetensors, …) "
                                               "unless 'overwrite' is on."}),
            "dtype": ([AS_STORED] + DTYPE_CHOICES, {
                "default": AS_STORED,
                "tooltip": "Precision written to the file; 'as stored' keeps each module's own."}),
            "overwrite": ("BOOLEAN", {"default": False,
                                      "tooltip": "On: write exactly this name, replacing a file of that name. "
                                                 "Off: never replace anything; each run writes the next "
                                                 "numbered name."}),
        }}

    def run(self, lora, filename, dtype, overwrite):
        import folder_paths
        folder = folder_paths.get_folder_paths("loras")[0]
        path, name = save_lora(lora, folder, filename, save_dtype(dtype), overwrite)
        return node_result((name,), tables=[table("Saved LoRA", ["", ""], [
            ["file", name], ["folder", folder], ["modules", str(len(lora.modules))]])], text=path)


_MODEL_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".sft", ".safetensors")


def lora_file_name(filename: str) -> str:
    """The name typed into the Save node as 'sub/name.safetensors': cleaned
    (core.save.clean_relative_name) and given the .safetensors extension the
    data has (another model extension is replaced, anything else kept)."""
    from ..core.errors import LoraError
    from ..core.save import clean_relative_name

    name = clean_relative_name(filename)
    stem, ext = os.path.splitext(name)
    if ext.lower() in _MODEL_SUFFIXES:
        name = stem
    if not os.path.basename(name):
        raise LoraError(f"file name {filename!r} has no name before the extension")
    return name + ".safetensors"


def save_lora(lora, folder: str, filename: str, dtype=None, overwrite: bool = False) -> tuple[str, str]:
    """Save into ``folder`` (never outside it); returns (absolute path, name
    relative to folder). Without ``overwrite`` the name is numbered
    (name_00001.safetensors, …), so re-running a workflow never fails and
    never replaces an earlier result."""
    from ..core.errors import LoraError
    from ..core.save import safe_output_path, save_kohya

    path = safe_output_path(folder, lora_file_name(filename))
    try:
        path = save_kohya(as_written(lora, dtype), path, dtype=dtype, overwrite=overwrite,
                          extra_metadata=_recipe_metadata(lora), numbered=not overwrite)
    except LoraError as err:
        # the core speaks of --overwrite; this node's switch is the 'overwrite' toggle
        raise LoraError(err.message.replace("pass --overwrite", "turn on 'overwrite'")
                        .replace("pass overwrite", "turn on 'overwrite'"), err.path, err.key) from None
    rel = os.path.relpath(path, os.path.realpath(folder)).replace(os.sep, "/")
    return path, rel


def _recipe_metadata(lora) -> dict:
    """A merge keeps its recipe; any other LoRA (a conversion) keeps what
    `python -m core convert` keeps: the training metadata and where it came from."""
    from ..core.conversion import carried_metadata
    from ..core.merge import RECIPE_KEY

    if RECIPE_KEY in (lora.metadata or {}):
        return {RECIPE_KEY: lora.metadata[RECIPE_KEY]}
    return carried_metadata(lora)
