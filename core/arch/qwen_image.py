"""Qwen-Image MM-DiT (ComfyUI ``comfy/ldm/qwen_image/model.py``).

60 double-stream blocks of width 3072 (24 heads × 128); text from
Qwen2.5-VL-7B (3584 wide). ComfyUI keeps the diffusers module names, so the
LDM key *is* the diffusers key and no module is split: kohya/musubi
``lora_unet_transformer_blocks_0_attn_to_q``, ComfyUI
``diffusion_model.transformer_blocks.0.attn.to_q``, diffusers/ai-toolkit
``transformer.transformer_blocks.0.attn.to_q`` and DiffSynth's bare key all
name one module. Qwen-Image, -Edit, -Edit-2509/2511 and -2512 share these
shapes.

Text encoder: Qwen2.5-VL-7B language layers, kohya ``lora_te_layers_N_…``
(ComfyUI's single-encoder map), ComfyUI ``qwen25_7b.transformer.model.…``.
"""
from __future__ import annotations

from ..sdarch import Arch
from .common import block, linear, table
from .text import llama_encoder

FAMILY = "qwen_image"
VARIANTS = ("base",)

H, DEPTH, TXT, IN, OUT = 3072, 60, 3584, 64, 64


@table(FAMILY, VARIANTS)
def build(arch: Arch, variant: str):
    h = H
    linear(arch, "img_in", (h, IN), "embed")
    linear(arch, "txt_in", (h, TXT), "embed")
    linear(arch, "time_text_embed.timestep_embedder.linear_1", (h, 256), "embed")
    linear(arch, "time_text_embed.timestep_embedder.linear_2", (h, h), "embed")
    for i in range(DEPTH):
        g, tb = block("transformer_blocks", i), f"transformer_blocks.{i}"
        for stream in ("img", "txt"):
            linear(arch, f"{tb}.{stream}_mod.1", (6 * h, h), g)
        for sub in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj",
                    "to_out.0", "to_add_out"):
            linear(arch, f"{tb}.attn.{sub}", (h, h), g)
        for stream in ("img", "txt"):
            linear(arch, f"{tb}.{stream}_mlp.net.0.proj", (4 * h, h), g)
            linear(arch, f"{tb}.{stream}_mlp.net.2", (h, 4 * h), g)
    linear(arch, "norm_out.linear", (2 * h, h), "final")
    linear(arch, "proj_out", (OUT, h), "final")
    llama_encoder(arch, "lora_te_", "te", "qwen25_7b", layers=28, width=3584, inter=18944, heads=28,
                  kv_heads=4)

