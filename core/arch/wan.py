"""Wan 2.1 / 2.2 video DiT (ComfyUI ``comfy/ldm/wan/model.py`` WanModel).

Widths (ComfyUI ``model_detection``: heads = dim/128):
  1.3b  Wan 2.1 T2V 1.3B       dim 1536, ffn 8960,  30 blocks
  14b   Wan 2.1/2.2 14B        dim 5120, ffn 13824, 40 blocks (2.2's high- and
        low-noise experts and 2.2 I2V have these shapes)
  5b    Wan 2.2 TI2V 5B        dim 3072, ffn 14336, 30 blocks, 48 latent channels
and ``…-i2v`` (Wan 2.1 I2V/FLF, Fun-InP): image cross-attention ``k_img``/
``v_img`` in every block and the CLIP-vision projection ``img_emb``.

Diffusers (WanTransformer3DModel; diffusers ``_convert_non_diffusers_wan_
lora_to_diffusers``): self_attn.{q,k,v,o} ↔ attn1.{to_q,to_k,to_v,to_out.0},
cross_attn.… ↔ attn2.…, k_img/v_img ↔ attn2.add_k_proj/add_v_proj,
ffn.0/ffn.2 ↔ ffn.net.0.proj/ffn.net.2, head.head ↔ proj_out, text/time
embeddings ↔ condition_embedder.*; nothing is split. The patch embedding is
a Conv3d (weight 5-D, flattened to dim × in·1·2·2 like a conv).

Text encoder: UMT5-XXL. ComfyUI maps a UMT5 LoRA only by its own key
``text_encoders.umt5xxl.transformer.encoder.block.N.…``; its canonical name
here is ``lora_te_encoder_block_N_…``.
"""
from __future__ import annotations

from ..sdarch import Arch
from .common import block, linear, table
from .text import t5_encoder

FAMILY = "wan"
# width -> (dim, ffn, blocks, latent channels)
_SIZES = {"1.3b": (1536, 8960, 30, 16), "14b": (5120, 13824, 40, 16), "5b": (3072, 14336, 30, 48)}
# preferred first: a T2V file fits its I2V table too (a superset)
VARIANTS = ("14b", "1.3b", "5b", "14b-i2v", "1.3b-i2v")

FREQ, TEXT, CLIP_VISION, PATCH, PATCH_3D = 256, 4096, 1280, 4, (1, 2, 2)


@table(FAMILY, VARIANTS)
def build(arch: Arch, variant: str):
    size, _, mode = variant.partition("-")
    dim, ffn, depth, latent = _SIZES[size]
    i2v = mode == "i2v"
    # a Conv3d (1×2×2 patches); I2V models take 36 channels (latent, mask, image latent)
    linear(arch, "patch_embedding", (dim, 36 if i2v else latent, *PATCH_3D), "embed", "patch_embedding")
    linear(arch, "text_embedding.0", (dim, TEXT), "embed", "condition_embedder.text_embedder.linear_1")
    linear(arch, "text_embedding.2", (dim, dim), "embed", "condition_embedder.text_embedder.linear_2")
    linear(arch, "time_embedding.0", (dim, FREQ), "embed", "condition_embedder.time_embedder.linear_1")
    linear(arch, "time_embedding.2", (dim, dim), "embed", "condition_embedder.time_embedder.linear_2")
    linear(arch, "time_projection.1", (6 * dim, dim), "embed", "condition_embedder.time_proj")
    if i2v:
        linear(arch, "img_emb.proj.1", (CLIP_VISION, CLIP_VISION), "embed",
               "condition_embedder.image_embedder.ff.net.0.proj")
        linear(arch, "img_emb.proj.3", (dim, CLIP_VISION), "embed",
               "condition_embedder.image_embedder.ff.net.2")
    for i in range(depth):
        g, b = block("blocks", i), f"blocks.{i}"
        for ldm, dif in (("self_attn", "attn1"), ("cross_attn", "attn2")):
            for o, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0")):
                linear(arch, f"{b}.{ldm}.{o}", (dim, dim), g, f"{b}.{dif}.{d}")
        if i2v:
            linear(arch, f"{b}.cross_attn.k_img", (dim, dim), g, f"{b}.attn2.add_k_proj")
            linear(arch, f"{b}.cross_attn.v_img", (dim, dim), g, f"{b}.attn2.add_v_proj")
        linear(arch, f"{b}.ffn.0", (ffn, dim), g, f"{b}.ffn.net.0.proj")
        linear(arch, f"{b}.ffn.2", (dim, ffn), g, f"{b}.ffn.net.2")
    linear(arch, "head.head", (PATCH * latent, dim), "head", "proj_out")
    t5_encoder(arch, "lora_te_", "te", "umt5xxl")

