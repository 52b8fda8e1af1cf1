"""SD3 / SD3.5 MM-DiT (ComfyUI ``comfy/ldm/modules/diffusionmodules/mmdit.py``).

Hidden width is 64·depth (head size 64, one head per block): SD3 Medium and
SD3.5 Medium have 24 joint blocks of width 1536, SD3.5 Large (and Large
Turbo) 38 blocks of width 2432. SD3.5 Medium adds a second image
self-attention ``x_block.attn2`` in blocks 0–12 (MMDiT-X, 9 modulations
instead of 6). The last block's context half is "pre-only": qkv and a
2-way modulation, no output projection, no MLP.

Diffusers names come from ComfyUI's ``mmdit_to_diffusers``: the fused
``attn.qkv`` is ``to_q/to_k/to_v`` (image) and ``add_q_proj/add_k_proj/
add_v_proj`` (context). Two modulations are stored with scale and shift
swapped in diffusers (the last block's ``norm1_context.linear`` and
``norm_out.linear``): each is a split module landing in both halves.

Text encoders (kohya sd-scripts / ComfyUI): CLIP-L ``lora_te1_``, CLIP-G
``lora_te2_``, T5-XXL ``lora_te3_``.
"""
from __future__ import annotations

from ..sdarch import Arch
from .common import block, fused, linear, swapped, table
from .text import clip_l_g_t5

FAMILY = "sd3"
# variant -> (depth, blocks with x_block.attn2); preferred first when a file fits several
CONFIGS: dict[str, tuple[int, tuple[int, ...]]] = {
    "large": (38, ()),
    "3.5-medium": (24, tuple(range(13))),
    "medium": (24, ()),
}
VARIANTS = tuple(CONFIGS)

IN_CHANNELS, PATCH, POOLED, CONTEXT = 16, 2, 2048, 4096


@table(FAMILY, VARIANTS)
def build(arch: Arch, variant: str):
    depth, dual = CONFIGS[variant]
    h = 64 * depth
    linear(arch, "x_embedder.proj", (h, IN_CHANNELS, PATCH, PATCH), "embed", "pos_embed.proj")
    linear(arch, "t_embedder.mlp.0", (h, 256), "embed", "time_text_embed.timestep_embedder.linear_1")
    linear(arch, "t_embedder.mlp.2", (h, h), "embed", "time_text_embed.timestep_embedder.linear_2")
    linear(arch, "y_embedder.mlp.0", (h, POOLED), "embed", "time_text_embed.text_embedder.linear_1")
    linear(arch, "y_embedder.mlp.2", (h, h), "embed", "time_text_embed.text_embedder.linear_2")
    linear(arch, "context_embedder", (h, CONTEXT), "embed", "context_embedder")
    for i in range(depth):
        g, jb, tb = block("joint_blocks", i), f"joint_blocks.{i}", f"transformer_blocks.{i}"
        last = i == depth - 1
        # context half
        cb = f"{jb}.context_block"
        fused(arch, f"{cb}.attn.qkv", (3 * h, h), g,
              f"{tb}.attn.add_q_proj", f"{tb}.attn.add_k_proj", f"{tb}.attn.add_v_proj")
        if last:
            swapped(arch, f"{cb}.adaLN_modulation.1", (2 * h, h), g, f"{tb}.norm1_context.linear")
        else:
            linear(arch, f"{cb}.attn.proj", (h, h), g, f"{tb}.attn.to_add_out")
            linear(arch, f"{cb}.mlp.fc1", (4 * h, h), g, f"{tb}.ff_context.net.0.proj")
            linear(arch, f"{cb}.mlp.fc2", (h, 4 * h), g, f"{tb}.ff_context.net.2")
            linear(arch, f"{cb}.adaLN_modulation.1", (6 * h, h), g, f"{tb}.norm1_context.linear")
        # image half
        xb = f"{jb}.x_block"
        fused(arch, f"{xb}.attn.qkv", (3 * h, h), g,
              f"{tb}.attn.to_q", f"{tb}.attn.to_k", f"{tb}.attn.to_v")
        linear(arch, f"{xb}.attn.proj", (h, h), g, f"{tb}.attn.to_out.0")
        if i in dual:
            fused(arch, f"{xb}.attn2.qkv", (3 * h, h), g,
                  f"{tb}.attn2.to_q", f"{tb}.attn2.to_k", f"{tb}.attn2.to_v")
            linear(arch, f"{xb}.attn2.proj", (h, h), g, f"{tb}.attn2.to_out.0")
        linear(arch, f"{xb}.mlp.fc1", (4 * h, h), g, f"{tb}.ff.net.0.proj")
        linear(arch, f"{xb}.mlp.fc2", (h, 4 * h), g, f"{tb}.ff.net.2")
        linear(arch, f"{xb}.adaLN_modulation.1", ((9 if i in dual else 6) * h, h), g, f"{tb}.norm1.linear")
    swapped(arch, "final_layer.adaLN_modulation.1", (2 * h, h), "final", "norm_out.linear")
    linear(arch, "final_layer.linear", (PATCH * PATCH * IN_CHANNELS, h), "final", "proj_out")
    clip_l_g_t5(arch)

