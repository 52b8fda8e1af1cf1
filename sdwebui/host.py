"""What the pack needs from the running WebUI: its LoRA folders, its LoRA list and
its LoRA caches. A1111 1.10 and Forge differ only in the caches."""
from __future__ import annotations

import os
import sys


def networks():
    """The built-in Lora extension's ``networks`` module (A1111 ``extensions-builtin/Lora``,
    Forge ``sd_forge_lora``), imported by that extension under the plain name ``networks``."""
    mod = sys.modules.get("networks")
    if mod is None or not hasattr(mod, "available_networks"):
        raise RuntimeError("the WebUI's built-in Lora extension is not loaded (is it disabled?)")
    return mod


def is_forge(net=None) -> bool:
    return hasattr(net or networks(), "load_lora_state_dict")


def lora_dirs() -> list[str]:
    """The folders the WebUI reads LoRAs from; the first is where saves go."""
    from modules import shared

    opts = shared.cmd_opts
    dirs = [getattr(opts, "lora_dir", None), getattr(opts, "lyco_dir_backcompat", None)]
    out = []
    for d in dirs:
        if d and os.path.realpath(d) not in (os.path.realpath(x) for x in out):
            out.append(d)
    if not out:
        raise RuntimeError("the WebUI names no LoRA folder (shared.cmd_opts.lora_dir)")
    return out


def available(refresh: bool = False) -> dict[str, object]:
    """name → the Lora extension's NetworkOnDisk (``.filename``, ``.alias``)."""
    net = networks()
    if refresh or not net.available_networks:
        net.list_available_networks()
    return dict(net.available_networks)


def refresh() -> None:
    """Rescan the LoRA folders (what the cards' refresh button does)."""
    networks().list_available_networks()


def invalidate(name: str, path: str) -> list[str]:
    """Forget every cached copy of LoRA ``name`` (file ``path``) after it was overwritten,
    so the next image uses the new weights. Both WebUIs key their caches by name or file
    name, not content: A1111 keeps the loaded network in ``networks_in_memory`` and skips
    re-patching a layer whose (name, multiplier) list is unchanged; Forge keeps the file's
    tensors in an lru_cache (Forge Neo does not), the applied list in ``current_lora_hash`` and the patched
    state in each model's ``lora_loader``. Both cache the text-encoder conds by prompt.
    Returns what was cleared (for logs and tests)."""
    from modules import processing, shared

    net = networks()
    cleared = []
    model = getattr(shared, "sd_model", None)
    if is_forge(net):
        cache_clear = getattr(net.load_lora_state_dict, "cache_clear", None)   # Neo has no file cache
        if cache_clear is not None:
            cache_clear()
            cleared.append("load_lora_state_dict")
        if model is not None and hasattr(model, "current_lora_hash"):
            model.current_lora_hash = str([])
            cleared.append("current_lora_hash")
        for loader in _forge_lora_loaders(model):
            loader.loaded_hash = str([None])    # never equal to a real patch list: forces a refresh
            cleared.append("lora_loader")
    else:
        net.networks_in_memory.pop(name, None)
        net.loaded_networks[:] = [n for n in net.loaded_networks if getattr(n, "name", None) != name]
        cleared.append("networks_in_memory")
        if model is not None and hasattr(model, "modules"):
            for module in model.modules():
                if getattr(module, "network_current_names", ()):
                    module.network_current_names = ()   # re-patched from its backup on next forward
            cleared.append("network_current_names")
    cls = processing.StableDiffusionProcessing
    for attr in ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc"):
        cache = getattr(cls, attr, None)
        if isinstance(cache, list):
            setattr(cls, attr, [None] * len(cache))
            cleared.append(attr)
    return cleared


def _forge_lora_loaders(model) -> list:
    """Every distinct ``lora_loader`` behind Forge's current, original and applied UNet/CLIP."""
    found, seen = [], set()
    for holder in ("forge_objects", "forge_objects_original", "forge_objects_after_applying_lora"):
        objs = getattr(model, holder, None)
        for part in ("unet", "clip", "vae", "clipvision"):
            obj = getattr(objs, part, None)
            for patcher in (obj, getattr(obj, "patcher", None)):
                loader = getattr(getattr(patcher, "model", None), "lora_loader", None) \
                    or getattr(patcher, "lora_loader", None)
                if loader is not None and id(loader) not in seen:
                    seen.add(id(loader))
                    found.append(loader)
    return found


def option(key: str, default):
    """A value of the Settings section (default before the WebUI has its options)."""
    try:
        from modules import shared
        value = getattr(shared.opts, key, None)
    except ImportError:
        return default
    return default if value is None else value


def applied() -> list[dict]:
    """The LoRAs of the last generation and how many of their modules the WebUI matched
    to a layer (A1111 drops keys it cannot map with a debug log line only)."""
    from modules import shared

    net = networks()
    out = []
    for n in net.loaded_networks:
        on_disk = getattr(n, "network_on_disk", None)
        filename = getattr(on_disk, "filename", None)
        if is_forge(net):
            model = getattr(shared, "sd_model", None)
            objs = getattr(model, "forge_objects", None)
            patchers = [getattr(objs, "unet", None), getattr(getattr(objs, "clip", None), "patcher", None)]
            matched = sum(len(patches) for p in patchers
                          for key, patches in (getattr(p, "lora_patches", None) or {}).items() if key[0] == filename)
        else:
            matched = len(getattr(n, "modules", {}) or {})
        out.append({"name": n.name, "filename": filename, "matched_modules": matched})
    return out
