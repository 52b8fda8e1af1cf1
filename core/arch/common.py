"""The few table-building steps every DiT family shares.

Canonical names are kohya style ``lora_unet_<ComfyUI/LDM key, '.'→'_'>``;
the dotted LDM key and the dotted diffusers key (where the module is 1:1) are
aliases. Where diffusers splits a fused LDM weight, the parts are given by
their rows inside the fused weight (``Arch.add_split``).
"""
from __future__ import annotations

from functools import lru_cache

from ..sdarch import Arch

UNET = "lora_unet_"


def table(family: str, variants: tuple[str, ...]):
    """Decorator turning ``fill(arch, variant)`` into the family's
    ``build(variant=None) -> Arch``: lru-cached, the union of the variants
    for None, a KeyError naming the known variants otherwise."""
    def wrap(fill):
        @lru_cache(maxsize=None)
        def build(variant: str | None = None) -> Arch:
            if variant is None:
                from . import union
                return union(family, build)
            if variant not in variants:
                raise KeyError(f"{family} has no variant '{variant}' (known: {', '.join(variants)})")
            arch = Arch(family, variant=variant)
            fill(arch, variant)
            return arch
        build.__doc__ = fill.__doc__
        return build
    return wrap


def canonical(ldm: str) -> str:
    return UNET + ldm.replace(".", "_")


def block(kind: str, index: int) -> str:
    """Group label of one block, zero-padded so labels sort in depth order."""
    return f"{kind}.{index:02d}"


def linear(arch: Arch, ldm: str, shape: tuple[int, ...], group: str, *diffusers: str):
    """A module both layouts hold whole (diffusers aliases may be none, one or several)."""
    arch.add(canonical(ldm), shape, group, ldm, *(d for d in diffusers if d and d != ldm))


def fused(arch: Arch, ldm: str, shape: tuple[int, int], group: str, *parts: str):
    """A fused LDM weight that diffusers splits into equal-height ``parts``
    (e.g. qkv → to_q, to_k, to_v), stacked in that order along d_out."""
    height = shape[0] // len(parts)
    assert height * len(parts) == shape[0], (ldm, shape, parts)
    arch.add_split(canonical(ldm), shape, group,
                   [(p, k * height, (k + 1) * height) for k, p in enumerate(parts)], ldm)


def swapped(arch: Arch, ldm: str, shape: tuple[int, int], group: str, diffusers: str):
    """An adaLN modulation diffusers stores with its two halves swapped
    ((scale, shift) where the LDM weight holds (shift, scale)): one split
    module landing in both halves (ComfyUI applies ``swap_scale_shift``)."""
    half = shape[0] // 2
    arch.add_split(canonical(ldm), shape, group,
                   [(diffusers, 0, half, half), (diffusers, half, 2 * half, 0)], ldm)

