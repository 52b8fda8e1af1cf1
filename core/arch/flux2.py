"""Flux.2 Klein 4B and 9B: ``comfy/ldm/flux`` with global modulation
(``image_model: flux2``), gated SiLU MLPs (mlp_ratio 3), no biases, no
per-block modulation, no pooled-text input, no guidance embedder.

Klein 4B: width 3072, 5 double + 20 single blocks, Qwen3-4B text features
(3×2560 = 7680). Klein 9B: width 4096, 8 double + 24 single, Qwen3-8B
(3×4096 = 12288). diffusers (``Flux2Transformer2DModel``) names the single
block's fused input ``attn.to_qkv_mlp_proj`` (1:1) and splits the double
blocks' qkv as Flux.1 does. ComfyUI derives these widths from the
checkpoint (``model_detection``: hidden = img_in rows, heads = hidden/128,
depths by counting blocks; the context is three Qwen3 layers, ``klein_te``
layer=[9, 18, 27]); the diffusers configs agree (InvokeAI's presets: 4B
24 heads, 5 + 20 blocks; 9B 32 heads, 8 + 24 blocks; mlp_ratio 3).

Text encoder: Qwen3-4B / Qwen3-8B (36 layers, GQA 32/8 heads of 128), which
ComfyUI holds as ``qwen3_4b`` / ``qwen3_8b.transformer.model.layers.N…`` and
maps, as the only encoder, from kohya ``lora_te_layers_N_…`` too (Z-Image's
Qwen3-4B has the same table).
"""
from __future__ import annotations

from ..sdarch import Arch
from .common import table
from .flux import FluxConfig, add_flux
from .text import qwen3_encoder

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
ENCODERS = {"klein-4b": "4b", "klein-9b": "8b"}


@table("flux2", VARIANTS)
def build(arch: Arch, variant: str):
    add_flux(arch, CONFIGS[variant], time_embed="time_guidance_embed")
    qwen3_encoder(arch, ENCODERS[variant])
