"""Which base model a LoRA was trained for, from module names and shapes.

Shapes decide where they can (the UNet cross-attention context width is 768
for SD1.x, 1024 for SD2.x, 2048 for SDXL; CLIP widths 768/1024/1280); key
patterns name the transformer families (Flux: double/single blocks, SD3:
joint blocks); metadata (``ss_base_model_version``, ``ss_v2``,
``modelspec.architecture``) only breaks ties or fills in when the modules
say nothing.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Mapping

from .arch import FAMILY_MODULES
from .lora import FAMILIES

_CONTEXT_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_TE_WIDTH = {768: "sd1", 1024: "sd2", 1280: "sdxl"}

# HunyuanVideo's double/single blocks match Flux's in kohya spelling and width; the
# original repo's names that musubi-tuner and diffusion-pipe keep (img_mlp.fc1,
# img_mod.linear, modulation.linear, the text token refiner, a 20th double block) do not.
_HUNYUAN_VIDEO = re.compile(r"(?:^|_)(?:double_blocks_\d+_(?:img|txt)_(?:mlp_fc[12]|mod_linear)"
                            r"|single_blocks_\d+_modulation_linear|double_blocks_19_)|individual_token_refiner")
# A DiT's own top-level transformer_blocks.N.attn1 (LTX-Video): an SD UNet's sit inside
# attentions_N / input_blocks_N_1, SD3.5 Medium's second attention is attn2. Matched on the
# name as spelled: diffusers' Wan "transformer.blocks.0.attn1" flattens to the same string.
_LTX = re.compile(r"^(?:(?:transformer|diffusion_model|model\.diffusion_model|base_model\.model)\.|lora_unet_"
                  r"|lora_transformer_|lycoris_)?transformer_blocks[._]\d+[._]attn1[._]")
_FLUX = re.compile(r"(?:^|_)(double_blocks|single_blocks|single_transformer_blocks)_\d")
_SD3 = re.compile(r"(?:^|_)joint_blocks_\d|(?:^|_)(context_block|x_block)_")
_MMDIT = re.compile(r"transformer_blocks_\d+_(attn_add_[qkv]_proj|ff_context|norm1_context)")
_CROSS_KV = re.compile(r"attn2_(?:processor_)?to_[kv](?:_lora)?$")
_TE_ATTN = re.compile(r"encoder_layers_\d+_self_attn_(?:q|k|v)_proj$")
_TE2 = re.compile(r"^(lora_te2_|text_encoder_2_|text_encoders_clip_g_|clip_g_)")
_TE1 = re.compile(r"^(lora_te1_|text_encoders_clip_l_|clip_l_)")
# UNet paths that exist only in the 4-level SD1/SD2 UNet, or only in SDXL. SDXL's deep
# transformer_blocks sit inside a UNet block (attentions_0_, input_blocks_4_1_); a DiT's
# own top-level ones (diffusers Flux, SD3, Flux.2: transformer_blocks.4.ff.net.0) are not SDXL.
_SD12_ONLY = re.compile(r"(down_blocks_3|up_blocks_3|down_blocks_0_attentions|input_blocks_(10|11)_"
                        r"|input_blocks_[12]_1_|output_blocks_(9|10|11)_)")
_SDXL_ONLY = re.compile(r"\d_transformer_blocks_[2-9]_")


def family_from_metadata(metadata: Mapping[str, str] | None) -> str | None:
    """The family a file's metadata claims, if any."""
    md = metadata or {}
    own = md.get("grassmann_lora.family", "")
    if own in FAMILIES and own != "unknown":
        return own
    for text in (md.get("modelspec.architecture", ""), md.get("ss_base_model_version", "")):
        text = text.lower()
        if not text:
            continue
        if re.search(r"flux[-._ ]?2", text):
            return "flux2"
        if "flux" in text or "chroma" in text:
            return "flux"
        if "xl" in text:
            return "sdxl"
        if "v3" in text or "sd3" in text:
            return "sd3"
        if "v2" in text:
            return "sd2"
        if "v1" in text:
            return "sd1"
    if md.get("ss_v2", "").lower() == "true":
        return "sd2"
    return None


# Key patterns (dots as underscores) that make a DiT family worth fitting its
# table to (core.formats.fit decides among the candidates by names and shapes).
_DIT_HINTS: dict[str, re.Pattern] = {
    "flux": re.compile(r"(?:^|_)(double_blocks|single_blocks|single_transformer_blocks)_\d"
                       r"|transformer_blocks_\d+_attn_(?:add_[qkv]_proj|to_[qkv])$"),
    "flux2": re.compile(r"(?:^|_)(double_blocks|single_blocks|single_transformer_blocks)_\d"
                        r"|(?:double|single)_stream_modulation|to_qkv_mlp_proj|time_guidance_embed"
                        r"|transformer_blocks_\d+_attn_(?:add_[qkv]_proj|to_[qkv])$"),
    # diffusers MM-DiT blocks are shared with Flux; widths decide (fit). Top-level
    # transformer_blocks only: a UNet's sit after an index (attentions_0_, input_blocks_4_1_).
    "sd3": re.compile(r"(?:^|_)joint_blocks_\d|(?<!\d_)transformer_blocks_\d+_(?:attn2?_(?:add_[qkv]_proj|"
                      r"to_[qkv])$|ff_context_|norm1_context_)"),
    "qwen_image": re.compile(r"(?<!\d_)transformer_blocks_\d+_(?:img_mod|txt_mod|img_mlp|txt_mlp|"
                             r"attn_(?:add_[qkv]_proj|to_[qkv])$)"),
    "z_image": re.compile(r"(?:^|_)(?:layers|noise_refiner|context_refiner)_\d+_"
                          r"(?:attention|feed_forward|adaLN_modulation)_"),
    # top-level blocks.N (an SD UNet's are inner transformer_blocks.N)
    "wan": re.compile(r"(?:^(?:transformer_|diffusion_model_|lora_unet_|lora_transformer_|lycoris_)?"
                      r"|(?<!transformer)_)blocks_\d+_(?:self_attn|cross_attn|ffn|attn1|attn2)_"),
    "hidream": re.compile(r"(?:^|_)(?:double_stream_blocks|single_stream_blocks)_\d+_block_|caption_projection_\d"),
}


def dit_candidates(names: Iterable[str], metadata: Mapping[str, str] | None = None) -> list[str]:
    """DiT families (with a table in core.arch) whose key patterns occur, in
    the registry's order; the family the metadata claims is always tried."""
    flat = [n.replace(".", "_") for n in names]
    claimed = family_from_metadata(metadata)
    return [f for f in FAMILY_MODULES
            if f == claimed or (f in _DIT_HINTS and any(_DIT_HINTS[f].search(n) for n in flat))]


def _in_width(shape) -> int:
    return int(math.prod(shape[1:])) if shape is not None and len(shape) >= 2 else 0


def explain_family(names: Iterable[str], shapes: Mapping[str, tuple] | None = None,
                   metadata: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(family, the evidence that decided it). ``names`` are module names in any
    spelling; ``shapes`` maps them to base weight shapes (d_out, d_in, …)."""
    names = list(names)
    shapes = shapes or {}
    flat = {n: n.replace(".", "_") for n in names}
    claimed = family_from_metadata(metadata)

    if any(_HUNYUAN_VIDEO.search(f) for f in flat.values()):
        return "hunyuan_video", "HunyuanVideo block names (img_mlp.fc1, img_mod.linear, …)"
    if any(_FLUX.search(f) for f in flat.values()):
        return "flux", "double/single transformer blocks"
    if any(_SD3.search(f) for f in flat.values()):
        return "sd3", "joint blocks"
    mmdit = [n for n, f in flat.items() if _MMDIT.search(f)]
    if mmdit:
        widths = {int(shapes[n][0]) for n in mmdit if n in shapes}
        if 3072 in widths or claimed == "flux":
            return "flux", "MM-DiT blocks of width 3072"
        return "sd3", "MM-DiT blocks"

    if any(_LTX.search(n) for n in names):
        return "ltx", "top-level transformer_blocks.N.attn1 (LTX-Video)"

    contexts = {_in_width(shapes.get(n)) for n, f in flat.items() if _CROSS_KV.search(f)} - {0}
    known = [_CONTEXT_WIDTH[c] for c in sorted(contexts) if c in _CONTEXT_WIDTH]
    if len(known) == 1 and len(contexts) == 1:
        return known[0], f"cross-attention context width {contexts.pop()}"

    te_widths = {int(shapes[n][0]) for n, f in flat.items() if _TE_ATTN.search(f) and n in shapes}
    has_te2 = any(_TE2.search(f) for f in flat.values())
    has_te1 = any(_TE1.search(f) for f in flat.values())
    if 1280 in te_widths or has_te2:
        if claimed in ("sd3", "flux"):
            return claimed, "second text encoder, metadata"
        return "sdxl", "second text encoder (CLIP-G)"
    if any(_SDXL_ONLY.search(f) for f in flat.values()):
        return "sdxl", "transformer depth > 2"
    sd12 = any(_SD12_ONLY.search(f) for f in flat.values())
    if te_widths == {1024}:
        return "sd2", "text encoder width 1024"
    if te_widths == {768} and not has_te1:
        return "sd1", "text encoder width 768"
    if sd12:
        if claimed in ("sd1", "sd2"):
            return claimed, "4-level UNet, metadata"
        proj = {len(shapes[n]) for n, f in flat.items() if f.endswith(("proj_in", "proj_out")) and n in shapes}
        if proj == {4}:
            return "sd1", "4-level UNet with 1×1 conv projections"
        return "sd1", "4-level UNet (SD1/SD2 not distinguishable; assumed SD1.x)"
    if claimed:
        return claimed, "metadata"
    if has_te1 and te_widths == {768}:
        return "sdxl", "lora_te1_ text encoder"
    return "unknown", "no deciding module or metadata"


def detect_family(names: Iterable[str], shapes: Mapping[str, tuple] | None = None,
                  metadata: Mapping[str, str] | None = None) -> str:
    """A family id of core.lora.FAMILIES ('unknown' when nothing decides).
    DiT families are refined by fitting tables (core.formats.fit)."""
    return explain_family(names, shapes, metadata)[0]
