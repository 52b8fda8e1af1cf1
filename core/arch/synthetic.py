"""Synthetic LoRA files of any DiT table, in every trainer's naming.

One piece of code for every family: the table says each module's LDM key,
its diffusers key and, for a fused module, the rows of each diffusers part
(``Arch.split_parts``). A synthetic LoRA is held fused (one up/down per
canonical module, in LDM rows) and written in any format; a diffusers-layout
file gets the rows of each part (``up[start:end]``, the same down), so a file
and its conversion hold exactly the same ΔW. ``random_parts`` makes a LoRA
the way diffusers trainers do (independent factors per split part), fused as
the readers fuse it (block-diagonal up, stacked down).

Formats (module key spellings, roles):
  kohya       lora_unet_<LDM_key>            lora_down/lora_up/alpha (sd-scripts, musubi-tuner)
  comfyui     diffusion_model.<LDM.key>      lora_down/lora_up/alpha (ComfyUI's own)
  diffusers   transformer.<diffusers.key>    lora_A/lora_B (PEFT, ai-toolkit; no alpha)
  onetrainer  lora_transformer_<diffusers_key> lora_down/lora_up/alpha
  lycoris     lycoris_<diffusers_key>        lora_down/lora_up/alpha (SimpleTuner)
  loha, lokr  lycoris_<diffusers_key>        LyCORIS LoHa (B·A ⊙ 1·1ᵀ) / LoKr (kron([[1]], B·A)):
                                             the same ΔW as LoHa/LoKr files
  diffsynth   <diffusers.key>                lora_A/lora_B (bare keys)
Text-encoder modules are written under their canonical kohya name in every
format (trainers of these families write them that way, if at all).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from ..sdarch import Arch
from .common import UNET

_FIRST_LAYER = re.compile(r"(layers|block)_0_|projection")
FORMATS = ("kohya", "comfyui", "diffusers", "onetrainer", "lycoris", "loha", "lokr", "diffsynth")
LDM_FORMATS = ("kohya", "comfyui")


@dataclass
class Synthetic:
    """Fused factors per canonical module: ΔW = scale · up @ down (d_out × d_in flat)."""

    arch: Arch
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)

    def delta(self, name: str, cols: slice = slice(None)) -> torch.Tensor:
        """Dense ΔW of one module in float64 (on a column slice: fused weights are large)."""
        up, down, scale = self.modules[name]
        return scale * up.double() @ down.reshape(down.shape[0], -1)[:, cols].double()


def ldm_key(arch: Arch, name: str) -> str:
    """The dotted LDM key of a canonical unet module (the alias that spells it)."""
    body = name[len(UNET):]
    for alias, canonical in arch.aliases.items():
        if canonical == name and "." in alias and alias.replace(".", "_") == body:
            return alias
    return body  # a key without dots


def diffusers_key(arch: Arch, name: str) -> str:
    """The dotted diffusers key of a whole (unsplit) module: its first dotted
    alias other than the LDM key; the LDM key where both layouts share it."""
    ldm = ldm_key(arch, name)
    for alias, canonical in arch.aliases.items():
        if canonical == name and "." in alias and alias != ldm:
            return alias
    return ldm


def _factors(d_out: int, d_in: int, rank: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    r = min(rank, d_out, d_in)
    return torch.randn(d_out, r, generator=gen) * 1e-2, torch.randn(r, d_in, generator=gen) / math.sqrt(d_in)


def _flat(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[0], int(math.prod(shape[1:]))


def random_fused(arch: Arch, names: list[str], rank: int = 4, seed: int = 0,
                 alpha: float | None = None) -> Synthetic:
    """One random rank-``rank`` factor pair per module (kohya-trained: fused layout)."""
    gen = torch.Generator().manual_seed(seed)
    out = Synthetic(arch)
    for name in names:
        up, down = _factors(*_flat(arch.shapes[name]), rank, gen)
        out.modules[name] = (up, down, (alpha if alpha is not None else up.shape[1]) / up.shape[1])
    return out


def random_parts(arch: Arch, names: list[str], rank: int = 4, seed: int = 0) -> Synthetic:
    """Independent factors per diffusers part of each split module (diffusers-
    trained), fused exactly: block-diagonal up, stacked down, scale 1."""
    gen = torch.Generator().manual_seed(seed)
    out = Synthetic(arch)
    for name in names:
        d_out, d_in = _flat(arch.shapes[name])
        parts = arch.split_parts.get(name)
        if not parts:
            up, down = _factors(d_out, d_in, rank, gen)
            out.modules[name] = (up, down, 1.0)
            continue
        ups, downs = [], []
        for alias in dict.fromkeys(p[0] for p in parts):
            places = [(s, e, f) for a, s, e, f in parts if a == alias]
            part_rows = max(f + e - s for s, e, f in places)
            pu, pd = _factors(part_rows, d_in, rank, gen)
            up = torch.zeros(d_out, pu.shape[1])
            for s, e, f in places:
                up[s:e] = pu[f:f + e - s]
            ups.append(up)
            downs.append(pd)
        out.modules[name] = (torch.cat(ups, 1), torch.cat(downs, 0), 1.0)
    return out


def _roles(fmt: str) -> tuple[str, str, bool]:
    """(up suffix, down suffix, writes alpha)."""
    if fmt in ("diffusers", "diffsynth"):
        return ".lora_B.weight", ".lora_A.weight", False
    if fmt == "loha":  # ΔW = α/r · (w1_a w1_b) ⊙ (w2_a w2_b), with w2 all ones
        return ".hada_w1_a", ".hada_w1_b", True
    if fmt == "lokr":  # ΔW = α/r · kron(w1, w2_a w2_b), with w1 = [[1]]
        return ".lokr_w2_a", ".lokr_w2_b", True
    return ".lora_up.weight", ".lora_down.weight", True


def _module_key(fmt: str, ldm: str, dif: str) -> str:
    return {"kohya": UNET + ldm.replace(".", "_"), "comfyui": f"diffusion_model.{ldm}",
            "diffusers": f"transformer.{dif}", "onetrainer": "lora_transformer_" + dif.replace(".", "_"),
            "lycoris": "lycoris_" + dif.replace(".", "_"), "loha": "lycoris_" + dif.replace(".", "_"),
            "lokr": "lycoris_" + dif.replace(".", "_"), "diffsynth": dif}[fmt]


def tensors(lora: Synthetic, fmt: str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The state dict of ``lora`` in format ``fmt`` (see the module docstring).
    Split modules in a diffusers format become their parts (rows of the fused
    up; an absent part stays absent); formats without alpha fold the scale into up."""
    if fmt not in FORMATS:
        raise KeyError(f"unknown synthetic format '{fmt}' (known: {', '.join(FORMATS)})")
    arch = lora.arch
    up_key, down_key, has_alpha = _roles(fmt)
    out: dict[str, torch.Tensor] = {}

    def put(key: str, up: torch.Tensor, down: torch.Tensor, scale: float):
        if not has_alpha:
            up = up * scale
        if fmt in ("loha", "lokr"):  # flat factors; the neutral second factor
            up, down = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
            if fmt == "loha":
                out[key + ".hada_w2_a"] = torch.ones(up.shape[0], 1, dtype=dtype)
                out[key + ".hada_w2_b"] = torch.ones(1, down.shape[1], dtype=dtype)
            else:
                out[key + ".lokr_w1"] = torch.ones(1, 1, dtype=dtype)
        out[key + up_key] = up.to(dtype).contiguous()
        out[key + down_key] = down.to(dtype).contiguous()
        if has_alpha:
            out[key + ".alpha"] = torch.tensor(scale * down.shape[0], dtype=torch.float32)

    for name, (up, down, scale) in lora.modules.items():
        if not name.startswith(UNET):
            put(name, up, down, scale)
            continue
        ldm = ldm_key(arch, name)
        parts = arch.split_parts.get(name)
        if fmt in LDM_FORMATS or not parts:
            shape = arch.shapes[name]
            if len(shape) == 4:  # a conv: factors as the trainers store them (r×c×kh×kw, d_out×r×1×1)
                up, down = up.reshape(*up.shape, 1, 1), down.reshape(down.shape[0], *shape[1:])
            put(_module_key(fmt, ldm, ldm if fmt in LDM_FORMATS else diffusers_key(arch, name)),
                up, down, scale)
            continue
        for alias in dict.fromkeys(p[0] for p in parts):
            places = [(s, e, f) for a, s, e, f in parts if a == alias]
            part_up = torch.zeros(max(f + e - s for s, e, f in places), up.shape[1])
            for s, e, f in places:
                part_up[f:f + e - s] = up[s:e]
            keep = part_up.abs().sum(0) > 0  # columns of other parts (block-diagonal up) carry nothing here
            if keep.any():
                put(_module_key(fmt, ldm, alias), part_up[:, keep], down[keep], scale)
    return out


def sample_names(arch: Arch, blocks: int = 1, text_encoder: bool = True) -> list[str]:
    """Every table module outside the blocks, every module of the first
    ``blocks`` blocks and the last block of each block kind, and (optionally)
    the first text-encoder layer: each module kind of the table, small."""
    by_group: dict[str, list[str]] = {}
    for name in arch.shapes:
        by_group.setdefault(arch.groups[name], []).append(name)
    kinds: dict[str, list[str]] = {}
    for group in by_group:
        kind, dot, index = group.partition(".")
        if dot and index.isdigit():
            kinds.setdefault(kind, []).append(group)
    keep = set()
    for groups in kinds.values():
        keep.update(groups[:blocks] + groups[-1:])
    names = []
    for group, members in by_group.items():
        kind, dot, index = group.partition(".")
        te = not members[0].startswith(UNET)
        if te:
            if text_encoder:
                names.extend(m for m in members if _FIRST_LAYER.search(m))
        elif not (dot and index.isdigit()) or group in keep:
            names.extend(members)
    return names
