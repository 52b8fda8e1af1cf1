"""Flux.2 Klein 4B and 9B: ``comfy/ldm/flux`` with global modulation
(``image_model: flux2``), gated SiLU MLPs (mlp_ratio 3), no biases, no
per-block modulation, no pooled-text input, no guidance embedder.

Klein 4B: width 3072, 5 double + 20 single blocks, Qwen3-4B text features
(3×2560 = 7680). Klein 9B: width 4096, 8 double + 24 single, Qwen3-8B
(3×4096 = 12288). diffusers (``Flux2Transformer2DModel``) names the single
block's fused input ``attn.to_qkv_mlp_proj`` (1:1) and splits the double
blocks' qkv as Flux.1 does. Text-encoder LoRAs (Qwen3) are not tabled yet.
"""
from __future__ import annotations

from ..sdarch import Arch
from .common import table
from .flux import FluxConfig, add_flux

VARIANTS = ("klein-4b", "klein-9b")


def _config(hidden: int, depth: int, depth_single: int, context: int) -> FluxConfig:
    mlp = 3 * hidden
    return FluxConfig(hidden=hidden, depth=depth, depth_single=depth_single, mlp_in=2 * mlp,
                      mlp_hidden=mlp, in_channels=128, out_channels=128, context=context, vec_in=None,
                      guidance=False, block_modulation=False, global_modulation=True, single_split=False)


CONFIGS = {
    "klein-4b": _config(3072, 5, 20, 7680),
    "klein-9b": _config(4096, 8, 24, 12288),
}


@table("flux2", VARIANTS)
def build(arch: Arch, variant: str):
    add_flux(arch, CONFIGS[variant], time_embed="time_guidance_embed")
