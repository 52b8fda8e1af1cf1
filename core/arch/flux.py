"""Flux.1 (dev, schnell) and Chroma: the MM-DiT of ``comfy/ldm/flux`` and
``comfy/ldm/chroma`` at full depth (19 double + 38 single blocks, width 3072).

Canonical names are kohya's ``lora_unet_<LDM key>``; aliases are the dotted
LDM key and the diffusers key where it is 1:1. diffusers splits three fused
LDM weights, kept here as split layouts (``comfy/utils.py flux_to_diffusers``):
double ``img_attn.qkv`` = to_q|to_k|to_v, ``txt_attn.qkv`` =
add_q_proj|add_k_proj|add_v_proj, single ``linear1`` = to_q|to_k|to_v|proj_mlp;
and ``norm_out.linear`` is ``final_layer.adaLN_modulation.1`` with its
scale/shift halves swapped. Text encoders: CLIP-L ``lora_te1_``, T5-XXL
``lora_te3_`` (what sd-scripts writes; ComfyUI also maps ``lora_te2_`` to T5);
Chroma has T5 alone, which ComfyUI maps as ``lora_te1_``.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..sdarch import Arch, _text_encoder
from .common import block, canonical, fused, linear, swapped, table
from .text import t5_encoder

VARIANTS = ("dev", "schnell", "chroma")


@dataclass(frozen=True)
class FluxConfig:
    hidden: int = 3072
    depth: int = 19
    depth_single: int = 38
    mlp_in: int = 12288          # img_mlp.0 rows (2× the MLP width when the MLP is gated)
    mlp_hidden: int = 12288      # img_mlp.2 columns
    in_channels: int = 64        # img_in columns (after patchify)
    out_channels: int = 64       # final_layer.linear rows
    context: int = 4096          # txt_in columns
    vec_in: int | None = 768     # vector_in (CLIP pooled); None: absent
    guidance: bool = True
    time_in: bool = True         # Chroma feeds the timestep to its approximator instead
    block_modulation: bool = True   # img_mod/txt_mod/modulation per block (Flux.1)
    global_modulation: bool = False  # shared modulation layers (Flux.2)
    single_split: bool = True    # diffusers splits single-block linear1 into q, k, v, proj_mlp
    final_adaln: bool = True
    approximator: tuple[int, int, int] | None = None  # Chroma (in_dim, hidden_dim, layers)


def add_flux(arch: Arch, c: FluxConfig, time_embed: str = "time_text_embed") -> None:
    """The diffusion-model modules of a Flux-style MM-DiT, in depth order."""
    h = c.hidden

    def add(ldm: str, shape, group, *diffusers: str):
        linear(arch, ldm, shape, group, *diffusers)

    add("img_in", (h, c.in_channels), "input", "x_embedder")
    add("txt_in", (h, c.context), "input", "context_embedder")
    if c.time_in:
        add("time_in.in_layer", (h, 256), "input", f"{time_embed}.timestep_embedder.linear_1")
        add("time_in.out_layer", (h, h), "input", f"{time_embed}.timestep_embedder.linear_2")
    if c.vec_in:
        add("vector_in.in_layer", (h, c.vec_in), "input", f"{time_embed}.text_embedder.linear_1")
        add("vector_in.out_layer", (h, h), "input", f"{time_embed}.text_embedder.linear_2")
    if c.guidance:
        add("guidance_in.in_layer", (h, 256), "input", f"{time_embed}.guidance_embedder.linear_1")
        add("guidance_in.out_layer", (h, h), "input", f"{time_embed}.guidance_embedder.linear_2")
    if c.approximator:
        a_in, a_hidden, layers = c.approximator
        add("distilled_guidance_layer.in_proj", (a_hidden, a_in), "input")
        for j in range(layers):
            add(f"distilled_guidance_layer.layers.{j}.in_layer", (a_hidden, a_hidden), "input")
            add(f"distilled_guidance_layer.layers.{j}.out_layer", (a_hidden, a_hidden), "input")
        add("distilled_guidance_layer.out_proj", (h, a_hidden), "input")
    if c.global_modulation:
        add("double_stream_modulation_img.lin", (6 * h, h), "modulation",
            "double_stream_modulation_img.linear")
        add("double_stream_modulation_txt.lin", (6 * h, h), "modulation",
            "double_stream_modulation_txt.linear")
        add("single_stream_modulation.lin", (3 * h, h), "modulation", "single_stream_modulation.linear")

    for i in range(c.depth):
        ldm, dif, g = f"double_blocks.{i}", f"transformer_blocks.{i}", block("double_blocks", i)
        for side, ctx in (("img", ""), ("txt", "_context")):
            if c.block_modulation:
                add(f"{ldm}.{side}_mod.lin", (6 * h, h), g, f"{dif}.norm1{ctx}.linear")
            q, k, v = (("to_q", "to_k", "to_v") if side == "img" else
                       ("add_q_proj", "add_k_proj", "add_v_proj"))
            fused(arch, f"{ldm}.{side}_attn.qkv", (3 * h, h), g, *(f"{dif}.attn.{n}" for n in (q, k, v)))
            add(f"{ldm}.{side}_attn.proj", (h, h), g,
                f"{dif}.attn.to_out.0" if side == "img" else f"{dif}.attn.to_add_out")
            ff = "ff" if side == "img" else "ff_context"
            add(f"{ldm}.{side}_mlp.0", (c.mlp_in, h), g, f"{dif}.{ff}.net.0.proj", f"{dif}.{ff}.linear_in")
            add(f"{ldm}.{side}_mlp.2", (h, c.mlp_hidden), g, f"{dif}.{ff}.net.2", f"{dif}.{ff}.linear_out")

    for i in range(c.depth_single):
        ldm, dif, g = f"single_blocks.{i}", f"single_transformer_blocks.{i}", block("single_blocks", i)
        parts = [(f"{ldm}.linear1_qkv", 0, 3 * h)]  # ComfyUI's own partial key
        if c.single_split:  # Flux.2's diffusers model keeps linear1 whole (to_qkv_mlp_proj)
            parts += [(f"{dif}.attn.{n}", j * h, (j + 1) * h) for j, n in enumerate(("to_q", "to_k", "to_v"))]
            parts.append((f"{dif}.proj_mlp", 3 * h, 3 * h + c.mlp_in))
        arch.add_split(canonical(f"{ldm}.linear1"), (3 * h + c.mlp_in, h), g, parts, f"{ldm}.linear1",
                       f"{dif}.attn.to_qkv_mlp_proj")
        add(f"{ldm}.linear2", (h, h + c.mlp_hidden), g, f"{dif}.proj_out", f"{dif}.attn.to_out")
        if c.block_modulation:
            add(f"{ldm}.modulation.lin", (3 * h, h), g, f"{dif}.norm.linear")

    if c.final_adaln:
        swapped(arch, "final_layer.adaLN_modulation.1", (2 * h, h), "final", "norm_out.linear")
    add("final_layer.linear", (c.out_channels, h), "final", "proj_out")


CONFIGS = {
    "dev": FluxConfig(),
    "schnell": FluxConfig(guidance=False),
    "chroma": FluxConfig(vec_in=None, guidance=False, time_in=False, block_modulation=False, final_adaln=False,
                         approximator=(64, 5120, 5)),
}


@table("flux", VARIANTS)
def build(arch: Arch, variant: str):
    add_flux(arch, CONFIGS[variant])
    if variant == "chroma":  # T5 alone: ComfyUI maps it as the first text encoder
        t5_encoder(arch, "lora_te1_", "te1")
    else:
        _text_encoder(arch, "lora_te1_", 12, 768, 3072, "te1", "clip_l")
        t5_encoder(arch, "lora_te3_", "te3")
