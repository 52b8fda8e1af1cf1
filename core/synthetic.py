"""Synthetic LoRAs with the real module names and shapes of SD1.5 / SD2 / SDXL.

Used by the demo, the benchmarks and the tests. Factors are random Gaussian,
scaled like trained LoRAs (ΔW entries around 1e-3), and reproducible by seed.
"""
from __future__ import annotations

import math

import torch

from .lora import LoraFile, LoraModule, scale_from_alpha
from .sdarch import arch_for, attention_modules


def module_names(family: str, conv: bool = False, text_encoder: bool = True,
                 limit: int | None = None) -> list[str]:
    """Attention-only (kohya 'LoRA') or every table module (LoCon with conv=True)."""
    if conv:
        names = [n for n in arch_for(family).shapes
                 if text_encoder or n.startswith("lora_unet_")]
    else:
        names = attention_modules(family, text_encoder)
    return names[:limit] if limit else names


def _flat(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[0], int(math.prod(shape[1:]))


def random_lora(family: str = "sd1", rank: int = 8, seed: int = 0, conv: bool = False,
                text_encoder: bool = True, alpha: float | None = None, limit: int | None = None,
                names: list[str] | None = None, dtype: torch.dtype = torch.float32,
                path: str = "synthetic.safetensors") -> LoraFile:
    gen = torch.Generator().manual_seed(seed)
    arch = arch_for(family)
    alpha = float(rank) if alpha is None else alpha
    lora = LoraFile(path=path, format="kohya", family=family)
    for name in names or module_names(family, conv, text_encoder, limit):
        shape = arch.shapes[name]
        d_out, d_in = _flat(shape)
        r = min(rank, d_out, d_in)
        down = torch.randn(r, d_in, generator=gen) / math.sqrt(d_in)
        up = torch.randn(d_out, r, generator=gen) * 1e-2
        lora.modules[name] = LoraModule(name, up.to(dtype), down.to(dtype),
                                        scale_from_alpha(alpha, r), r, alpha, shape, "lora",
                                        dtype=dtype)
    return lora


def perturbed_lora(base: LoraFile, eps: float, seed: int, path: str | None = None) -> LoraFile:
    """A LoRA whose factors are base's plus relative Gaussian noise of size eps,
    so its subspaces lie close to base's (for 'related LoRA' families)."""
    gen = torch.Generator().manual_seed(seed)
    out = LoraFile(path=path or f"perturbed-{seed}.safetensors", format=base.format, family=base.family)
    for name, m in base.modules.items():
        up = m.up.float() + eps * m.up.float().std() * torch.randn(m.up.shape, generator=gen)
        down = m.down.float() + eps * m.down.float().std() * torch.randn(m.down.shape, generator=gen)
        out.modules[name] = LoraModule(name, up.to(m.dtype), down.to(m.dtype), m.scale, m.rank,
                                       m.alpha, m.weight_shape, m.kind, dtype=m.dtype)
    return out
