"""HiDream-I1 (ComfyUI ``comfy/ldm/hidream/model.py``).

Width 2560 (20 heads × 128): 16 double-stream blocks (image and text
attention, a mixture-of-experts feed-forward for the image and a plain
SwiGLU for the text) and 32 single-stream blocks; every feed-forward of the
image stream is 4 routed SwiGLU experts (hidden 6912) plus a shared one
(3584) and a 4 × 2560 router (``ff_i.gate.weight``, a plain matrix ComfyUI
patches like a linear). 49 caption projections of the Llama/T5 features.

ComfyUI keeps the diffusers module names (``transformer.<key>``, SimpleTuner's
``lycoris_<key>``): the LDM key is the diffusers key, nothing is split.
Text encoders (ComfyUI's HiDream clip: CLIP-L, CLIP-G, T5-XXL, Llama-3.1-8B):
CLIP-L ``lora_te1_``, CLIP-G ``lora_te2_``, T5 ``lora_te3_``; ComfyUI maps no
kohya name to Llama, so it is not in the table.
"""
from __future__ import annotations

from ..sdarch import Arch
from .common import block, linear, table
from .text import clip_l_g_t5

FAMILY = "hidream"
VARIANTS = ("i1",)

H, DOUBLE, SINGLE, EXPERTS, EXPERT_FF, SHARED_FF = 2560, 16, 32, 4, 6912, 3584
CAPTION, POOLED, PATCH_IN = 4096, 2048, 64


def _swiglu(arch: Arch, prefix: str, hidden: int, group: str):
    linear(arch, f"{prefix}.w1", (hidden, H), group)
    linear(arch, f"{prefix}.w2", (H, hidden), group)
    linear(arch, f"{prefix}.w3", (hidden, H), group)


def _block(arch: Arch, prefix: str, group: str, double: bool):
    linear(arch, f"{prefix}.adaLN_modulation.1", ((12 if double else 6) * H, H), group)
    for side in ("", "_t") if double else ("",):
        for p in ("to_q", "to_k", "to_v", "to_out"):
            linear(arch, f"{prefix}.attn1.{p}{side}", (H, H), group)
    _swiglu(arch, f"{prefix}.ff_i.shared_experts", SHARED_FF, group)
    for e in range(EXPERTS):
        _swiglu(arch, f"{prefix}.ff_i.experts.{e}", EXPERT_FF, group)
    linear(arch, f"{prefix}.ff_i.gate", (EXPERTS, H), group)
    if double:
        _swiglu(arch, f"{prefix}.ff_t", EXPERT_FF, group)


@table(FAMILY, VARIANTS)
def build(arch: Arch, variant: str):
    linear(arch, "t_embedder.timestep_embedder.linear_1", (H, 256), "embed")
    linear(arch, "t_embedder.timestep_embedder.linear_2", (H, H), "embed")
    linear(arch, "p_embedder.pooled_embedder.linear_1", (H, POOLED), "embed")
    linear(arch, "p_embedder.pooled_embedder.linear_2", (H, H), "embed")
    linear(arch, "x_embedder.proj", (H, PATCH_IN), "embed")
    for i in range(DOUBLE + SINGLE + 1):
        linear(arch, f"caption_projection.{i}.linear", (H, CAPTION), "embed")
    for i in range(DOUBLE):
        _block(arch, f"double_stream_blocks.{i}.block", block("double_stream_blocks", i), double=True)
    for i in range(SINGLE):
        _block(arch, f"single_stream_blocks.{i}.block", block("single_stream_blocks", i), double=False)
    linear(arch, "final_layer.linear", (PATCH_IN, H), "final")
    linear(arch, "final_layer.adaLN_modulation.1", (2 * H, H), "final")
    clip_l_g_t5(arch)
