"""Z-Image (ComfyUI's Lumina2 class, ``comfy/ldm/lumina/model.py`` NextDiT).

Width 3840 (30 heads × 128), 30 main ``layers`` plus 2 ``noise_refiner``
(image, modulated) and 2 ``context_refiner`` (caption, unmodulated) blocks;
SwiGLU feed-forward of 10240 (8/3 · 3840); modulation from a 256-wide time
embedding. Text from Qwen3-4B (2560 wide).

ComfyUI fuses q, k, v into ``attention.qkv``; diffusers (ai-toolkit, and
musubi-tuner's converted files) keeps ``attention.to_q/to_k/to_v``; ComfyUI's
``z_image_to_diffusers`` gives the rows (q 0:3840, k 3840:7680, v 7680:11520)
and ``attention.out`` ↔ ``attention.to_out.0``, ``x_embedder`` ↔
``all_x_embedder.2-1``, ``final_layer`` ↔ ``all_final_layer.2-1``.

Text encoder: Qwen3-4B layers, kohya ``lora_te_layers_N_…`` (ComfyUI's
single-encoder map), ComfyUI ``qwen3_4b.transformer.model.…``.
"""
from __future__ import annotations

from ..sdarch import Arch
from .common import block, fused, linear, table
from .text import qwen3_encoder

FAMILY = "z_image"
VARIANTS = ("base",)

H, DEPTH, REFINERS, FFN, T_EMB, CAP, PATCH_IN = 3840, 30, 2, 10240, 256, 2560, 64


def _block(arch: Arch, prefix: str, group: str, modulated: bool):
    h = H
    fused(arch, f"{prefix}.attention.qkv", (3 * h, h), group,
          f"{prefix}.attention.to_q", f"{prefix}.attention.to_k", f"{prefix}.attention.to_v")
    linear(arch, f"{prefix}.attention.out", (h, h), group, f"{prefix}.attention.to_out.0")
    linear(arch, f"{prefix}.feed_forward.w1", (FFN, h), group)
    linear(arch, f"{prefix}.feed_forward.w2", (h, FFN), group)
    linear(arch, f"{prefix}.feed_forward.w3", (FFN, h), group)
    if modulated:
        linear(arch, f"{prefix}.adaLN_modulation.0", (4 * h, T_EMB), group)


@table(FAMILY, VARIANTS)
def build(arch: Arch, variant: str):
    h = H
    linear(arch, "x_embedder", (h, PATCH_IN), "embed", "all_x_embedder.2-1")
    linear(arch, "t_embedder.mlp.0", (1024, 256), "embed")
    linear(arch, "t_embedder.mlp.2", (T_EMB, 1024), "embed")
    linear(arch, "cap_embedder.1", (h, CAP), "embed")
    for i in range(REFINERS):
        _block(arch, f"context_refiner.{i}", block("context_refiner", i), modulated=False)
    for i in range(REFINERS):
        _block(arch, f"noise_refiner.{i}", block("noise_refiner", i), modulated=True)
    for i in range(DEPTH):
        _block(arch, f"layers.{i}", block("layers", i), modulated=True)
    linear(arch, "final_layer.adaLN_modulation.1", (h, T_EMB), "final",
           "all_final_layer.2-1.adaLN_modulation.1")
    linear(arch, "final_layer.linear", (PATCH_IN, h), "final", "all_final_layer.2-1.linear")
    qwen3_encoder(arch, "4b")

