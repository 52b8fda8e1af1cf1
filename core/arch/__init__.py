"""Module tables of the DiT families (one module per family).

Each family module defines ``VARIANTS`` (its variant names, preferred first)
and ``build(variant=None) -> Arch`` (lru_cached): the table of one variant at
full depth with real widths, or with ``variant=None`` the union of the
variants' module names (shapes of the first variant that has the module).
Canonical names are kohya's ``lora_unet_<ComfyUI/LDM key, '.'→'_'>`` and
``lora_te{1,2,3}_…``; aliases are the dotted LDM and diffusers keys, and
``Arch.add_split`` records modules diffusers splits (read as one fused module
by ``core.formats``). Which table a file fits: ``core.formats.fit``.

This package must not import ``core.sdarch`` at import time (sdarch reads
``FAMILY_MODULES`` from here); the family modules import it when built.
"""
from __future__ import annotations

import importlib
from functools import lru_cache

# family id -> module in this package. Order = preference when a file fits
# several families equally (e.g. ambiguous diffusers block names).
FAMILY_MODULES: dict[str, str] = {
    "flux": "flux",
    "flux2": "flux2",
    "sd3": "sd3",
    "qwen_image": "qwen_image",
    "z_image": "z_image",
    "wan": "wan",
    "hidream": "hidream",
}


def _module(family: str):
    return importlib.import_module(f".{FAMILY_MODULES[family]}", __name__)


def variants(family: str) -> tuple[str, ...]:
    return tuple(_module(family).VARIANTS)


def build(family: str, variant: str | None = None):
    """The family's table (``variant`` None: the union of its variants)."""
    if family not in FAMILY_MODULES:
        raise KeyError(f"no architecture table for family '{family}'")
    return _module(family).build(variant)


def union(family: str, builder):
    """The union table of ``builder(v)`` over the family's variants, in order."""
    from ..sdarch import Arch

    arch = Arch(family)
    for v in _module(family).VARIANTS:
        arch.absorb(builder(v))
    return arch


# Text encoders whose kohya names ComfyUI does not map (it maps UMT5 only under
# its own state-dict path): family -> (kohya prefix, ComfyUI-native prefix).
_NATIVE_TE = {"wan": ("lora_te_", "text_encoders.umt5xxl.transformer.")}


def written_name(family: str, name: str) -> str:
    """The key stem the pack writes for a canonical module: the kohya name
    (``lora_unet_<LDM key>`` maps in ComfyUI, Forge and sd-scripts), except a
    text encoder ComfyUI maps only by its native path (Wan's UMT5)."""
    return _native_names(family).get(name, name) if family in _NATIVE_TE else name


@lru_cache(maxsize=None)
def _native_names(family: str) -> dict[str, str]:
    from ..sdarch import arch_for

    kohya, native = _NATIVE_TE[family]
    inner = native.split(".", 1)[1]           # the alias as the table spells it
    return {canon: "text_encoders." + alias for alias, canon in arch_for(family).aliases.items()
            if canon.startswith(kohya) and alias.startswith(inner)}
