"""The SD3/SD3.5, Qwen-Image, Z-Image and Wan tables at full depth: module
counts per kind, real widths, split parts tiling their fused rows, group
labels in depth order. Expected numbers are written from the architectures
(ComfyUI's model configs), not from the table code."""
import math
import re
from collections import Counter

import pytest

from core.arch import build, variants

# (family, variant) -> diffusion-model modules, text-encoder modules by slot
# SD3: 10 Linear per joint block (context + image: qkv, proj, fc1, fc2, adaLN), the last
# block's context half pre-only (qkv, adaLN); 6 embedders, 2 final; 3.5 Medium adds
# x_block.attn2 (qkv, proj) in blocks 0..12. CLIP-L 12×6+1, CLIP-G 32×6+1, T5-XXL 24×7.
SD3_TE = {"te1": 73, "te2": 193, "te3": 168}
EXPECTED = {
    ("sd3", "medium"): (23 * 10 + 7 + 8, SD3_TE),
    ("sd3", "3.5-medium"): (23 * 10 + 7 + 8 + 13 * 2, SD3_TE),
    ("sd3", "large"): (37 * 10 + 7 + 8, SD3_TE),
    # 60 blocks × (2 mod + 8 attn + 2×2 mlp) + img_in, txt_in, 2 time + norm_out, proj_out;
    # Qwen2.5-VL-7B 28 layers × 7
    ("qwen_image", "base"): (60 * 14 + 6, {"te": 28 * 7}),
    # 2 context_refiner × 5 + 2 noise_refiner × 6 + 30 layers × 6 + 4 embed + 2 final;
    # Qwen3-4B 36 layers × 7
    ("z_image", "base"): (2 * 5 + 2 * 6 + 30 * 6 + 6, {"te": 36 * 7}),
    # blocks × (8 attn + 2 ffn [+ k_img, v_img]) + patch + 5 embed [+ 2 img_emb] + head; UMT5-XXL 24 × 7
    ("wan", "1.3b"): (30 * 10 + 7, {"te": 168}),
    ("wan", "14b"): (40 * 10 + 7, {"te": 168}),
    ("wan", "5b"): (30 * 10 + 7, {"te": 168}),
    ("wan", "1.3b-i2v"): (30 * 12 + 9, {"te": 168}),
    ("wan", "14b-i2v"): (40 * 12 + 9, {"te": 168}),
    # 16 double × (adaLN + 8 attn + 5×3 SwiGLU experts (4 routed, 1 shared) + router + 3 text ff)
    # + 32 single × (adaLN + 4 attn + 15 + router) + t/p embedders (4), x_embedder, 49 caption
    # projections, 2 final; CLIP-L, CLIP-G, T5 as SD3
    ("hidream", "i1"): (16 * 28 + 32 * 21 + 4 + 1 + 49 + 2, SD3_TE),
}
FAMILIES = ("sd3", "qwen_image", "z_image", "wan", "hidream")


def _slot(name):
    return "unet" if name.startswith("lora_unet_") else name.split("_")[1]


def test_every_variant_is_checked():
    assert {(f, v) for f in FAMILIES for v in variants(f)} == set(EXPECTED)


@pytest.mark.parametrize("family,variant", sorted(EXPECTED))
def test_full_depth_counts(family, variant):
    arch = build(family, variant)
    slots = Counter(_slot(n) for n in arch.shapes)
    unet, te = EXPECTED[family, variant]
    assert slots.pop("unet") == unet
    assert dict(slots) == te
    assert arch.family == family and arch.variant == variant
    assert sorted(arch.order.values()) == list(range(len(arch.shapes)))


# (family, variant, LDM key, shape)
WIDTHS = [
    ("sd3", "medium", "joint_blocks.23.context_block.attn.qkv", (4608, 1536)),
    ("sd3", "medium", "joint_blocks.23.context_block.adaLN_modulation.1", (3072, 1536)),
    ("sd3", "3.5-medium", "joint_blocks.12.x_block.adaLN_modulation.1", (9 * 1536, 1536)),
    ("sd3", "3.5-medium", "joint_blocks.13.x_block.adaLN_modulation.1", (6 * 1536, 1536)),
    ("sd3", "3.5-medium", "joint_blocks.12.x_block.attn2.qkv", (4608, 1536)),
    ("sd3", "large", "joint_blocks.0.x_block.mlp.fc1", (4 * 2432, 2432)),
    ("sd3", "large", "context_embedder", (2432, 4096)),
    ("sd3", "large", "y_embedder.mlp.0", (2432, 2048)),
    ("sd3", "large", "x_embedder.proj", (2432, 16, 2, 2)),
    ("sd3", "large", "final_layer.linear", (64, 2432)),
    ("qwen_image", "base", "transformer_blocks.59.img_mod.1", (18432, 3072)),
    ("qwen_image", "base", "transformer_blocks.0.txt_mlp.net.2", (3072, 12288)),
    ("qwen_image", "base", "txt_in", (3072, 3584)),
    ("qwen_image", "base", "proj_out", (64, 3072)),
    ("z_image", "base", "layers.29.attention.qkv", (3 * 3840, 3840)),
    ("z_image", "base", "layers.0.feed_forward.w2", (3840, 10240)),
    ("z_image", "base", "noise_refiner.1.adaLN_modulation.0", (4 * 3840, 256)),
    ("z_image", "base", "cap_embedder.1", (3840, 2560)),
    ("z_image", "base", "final_layer.adaLN_modulation.1", (3840, 256)),
    ("wan", "1.3b", "blocks.29.ffn.0", (8960, 1536)),
    ("wan", "14b", "blocks.39.cross_attn.k", (5120, 5120)),
    ("wan", "14b", "time_projection.1", (6 * 5120, 5120)),
    ("wan", "5b", "head.head", (4 * 48, 3072)),
    ("wan", "5b", "blocks.0.ffn.2", (3072, 14336)),
    ("wan", "14b-i2v", "blocks.3.cross_attn.v_img", (5120, 5120)),
    ("wan", "14b-i2v", "img_emb.proj.3", (5120, 1280)),
    ("wan", "14b-i2v", "patch_embedding", (5120, 36, 1, 2, 2)),
    ("wan", "5b", "patch_embedding", (3072, 48, 1, 2, 2)),
    ("hidream", "i1", "double_stream_blocks.15.block.ff_i.experts.3.w2", (2560, 6912)),
    ("hidream", "i1", "single_stream_blocks.0.block.ff_i.shared_experts.w1", (3584, 2560)),
    ("hidream", "i1", "single_stream_blocks.31.block.ff_i.gate", (4, 2560)),
    ("hidream", "i1", "double_stream_blocks.0.block.adaLN_modulation.1", (12 * 2560, 2560)),
    ("hidream", "i1", "double_stream_blocks.0.block.attn1.to_v_t", (2560, 2560)),
    ("hidream", "i1", "caption_projection.48.linear", (2560, 4096)),
]


@pytest.mark.parametrize("family,variant,ldm,shape", WIDTHS)
def test_real_widths(family, variant, ldm, shape):
    arch = build(family, variant)
    name = arch.canonical(ldm)
    assert name == "lora_unet_" + ldm.replace(".", "_")
    assert arch.shapes[name] == shape


def test_absent_modules():
    assert build("sd3", "large").canonical("joint_blocks.37.context_block.mlp.fc1") is None  # pre-only
    assert build("sd3", "medium").canonical("joint_blocks.0.x_block.attn2.qkv") is None
    assert build("sd3", "3.5-medium").canonical("joint_blocks.13.x_block.attn2.qkv") is None
    assert build("z_image").canonical("context_refiner.0.adaLN_modulation.0") is None
    assert build("wan", "14b").canonical("blocks.0.cross_attn.k_img") is None


# (family, variant, diffusers spelling, LDM key it is, or the fused key + rows)
ALIASES = [
    ("sd3", "large", "transformer_blocks.5.attn.to_out.0", "joint_blocks.5.x_block.attn.proj"),
    ("sd3", "large", "transformer_blocks.5.attn.to_add_out", "joint_blocks.5.context_block.attn.proj"),
    ("sd3", "large", "transformer_blocks.5.ff_context.net.2", "joint_blocks.5.context_block.mlp.fc2"),
    ("sd3", "large", "transformer_blocks.5.norm1_context.linear", "joint_blocks.5.context_block.adaLN_modulation.1"),
    ("sd3", "large", "time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
    ("sd3", "large", "pos_embed.proj", "x_embedder.proj"),
    ("sd3", "large", "proj_out", "final_layer.linear"),
    ("sd3", "3.5-medium", "transformer_blocks.2.attn2.to_out.0", "joint_blocks.2.x_block.attn2.proj"),
    ("z_image", "base", "layers.4.attention.to_out.0", "layers.4.attention.out"),
    ("z_image", "base", "all_x_embedder.2-1", "x_embedder"),
    ("z_image", "base", "all_final_layer.2-1.linear", "final_layer.linear"),
    ("wan", "14b-i2v", "blocks.7.attn1.to_out.0", "blocks.7.self_attn.o"),
    ("wan", "14b-i2v", "blocks.7.attn2.to_k", "blocks.7.cross_attn.k"),
    ("wan", "14b-i2v", "blocks.7.attn2.add_v_proj", "blocks.7.cross_attn.v_img"),
    ("wan", "14b-i2v", "blocks.7.ffn.net.0.proj", "blocks.7.ffn.0"),
    ("wan", "14b-i2v", "condition_embedder.time_proj", "time_projection.1"),
    ("wan", "14b-i2v", "condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("wan", "14b-i2v", "proj_out", "head.head"),
    ("qwen_image", "base", "transformer_blocks.9.attn.add_k_proj", "transformer_blocks.9.attn.add_k_proj"),
]


@pytest.mark.parametrize("family,variant,diffusers,ldm", ALIASES)
def test_diffusers_aliases(family, variant, diffusers, ldm):
    arch = build(family, variant)
    want = "lora_unet_" + ldm.replace(".", "_")
    assert arch.canonical(diffusers) == want
    assert arch.canonical(diffusers.replace(".", "_")) == want  # OneTrainer / lycoris spelling


SPLITS = [  # fused LDM key, [(diffusers part, row_start, row_end, first part row)]
    ("sd3", "large", "joint_blocks.3.x_block.attn.qkv",
     [(f"transformer_blocks.3.attn.{p}", 2432 * i, 2432 * (i + 1), 0) for i, p in enumerate(("to_q", "to_k", "to_v"))]),
    ("sd3", "large", "joint_blocks.37.context_block.attn.qkv",
     [(f"transformer_blocks.37.attn.{p}", 2432 * i, 2432 * (i + 1), 0)
      for i, p in enumerate(("add_q_proj", "add_k_proj", "add_v_proj"))]),
    ("sd3", "3.5-medium", "joint_blocks.0.x_block.attn2.qkv",
     [(f"transformer_blocks.0.attn2.{p}", 1536 * i, 1536 * (i + 1), 0) for i, p in enumerate(("to_q", "to_k", "to_v"))]),
    # scale/shift stored swapped in diffusers (ComfyUI's swap_scale_shift)
    ("sd3", "large", "joint_blocks.37.context_block.adaLN_modulation.1",
     [("transformer_blocks.37.norm1_context.linear", 0, 2432, 2432),
      ("transformer_blocks.37.norm1_context.linear", 2432, 4864, 0)]),
    ("sd3", "medium", "final_layer.adaLN_modulation.1",
     [("norm_out.linear", 0, 1536, 1536), ("norm_out.linear", 1536, 3072, 0)]),
    ("z_image", "base", "noise_refiner.1.attention.qkv",
     [(f"noise_refiner.1.attention.{p}", 3840 * i, 3840 * (i + 1), 0) for i, p in enumerate(("to_q", "to_k", "to_v"))]),
]


@pytest.mark.parametrize("family,variant,ldm,parts", SPLITS)
def test_split_parts(family, variant, ldm, parts):
    arch = build(family, variant)
    name = "lora_unet_" + ldm.replace(".", "_")
    assert arch.canonical(ldm) == name
    assert sorted(arch.split_parts[name]) == sorted(parts)
    for alias, *_ in parts:
        assert arch.canonical(alias) is None  # a part is never a whole module
        assert arch.split_of(alias)[0] == name


@pytest.mark.parametrize("family", FAMILIES)
def test_split_parts_tile_their_module(family):
    """Every fused module's parts cover its rows exactly once, in parts of equal height."""
    for v in variants(family):
        arch = build(family, v)
        for name, parts in arch.split_parts.items():
            rows = sorted((s, e) for _, s, e, _ in parts)
            assert rows[0][0] == 0 and rows[-1][1] == arch.shapes[name][0], name
            assert all(a[1] == b[0] for a, b in zip(rows, rows[1:])), name
            assert len({e - s for s, e in rows}) == 1, name


@pytest.mark.parametrize("family", FAMILIES)
def test_groups_in_depth_order(family):
    """Diffusion-model groups are contiguous, blocks zero-padded '<kind>.NN' in depth order."""
    for v in variants(family):
        arch = build(family, v)
        seen = []
        for name in sorted((n for n in arch.shapes if n.startswith("lora_unet_")), key=arch.order.get):
            g = arch.groups[name]
            if not seen or seen[-1] != g:
                assert g not in seen, (name, g)
                seen.append(g)
        blocks = [g for g in seen if re.fullmatch(r"[a-z_]+\.\d{2}", g)]
        for kind in {g.split(".")[0] for g in blocks}:
            mine = [g for g in blocks if g.startswith(kind + ".")]
            assert mine == sorted(mine) and int(mine[-1][-2:]) == len(mine) - 1


def test_text_encoder_widths():
    sd3, qwen, z, wan = build("sd3", "large"), build("qwen_image"), build("z_image"), build("wan", "14b")
    assert sd3.shapes["lora_te2_text_model_encoder_layers_31_mlp_fc1"] == (5120, 1280)
    assert sd3.shapes["lora_te3_encoder_block_23_layer_1_DenseReluDense_wo"] == (4096, 10240)
    # GQA: k/v of 4 (Qwen2.5-VL-7B) and 8 (Qwen3-4B) heads of 128
    assert qwen.shapes["lora_te_layers_27_self_attn_k_proj"] == (512, 3584)
    assert qwen.shapes["lora_te_layers_0_mlp_down_proj"] == (3584, 18944)
    assert z.shapes["lora_te_layers_35_self_attn_q_proj"] == (4096, 2560)
    assert z.shapes["lora_te_layers_0_self_attn_o_proj"] == (2560, 4096)
    assert wan.shapes["lora_te_encoder_block_0_layer_0_SelfAttention_q"] == (4096, 4096)
    # ComfyUI's own spelling of the encoder weights
    assert qwen.canonical("qwen25_7b.transformer.model.layers.3.mlp.up_proj") == "lora_te_layers_3_mlp_up_proj"
    assert z.canonical("qwen3_4b.transformer.model.layers.3.self_attn.v_proj") == "lora_te_layers_3_self_attn_v_proj"
    assert wan.canonical("umt5xxl.transformer.encoder.block.2.layer.0.SelfAttention.o") == \
        "lora_te_encoder_block_2_layer_0_SelfAttention_o"
    assert sd3.canonical("t5xxl.transformer.encoder.block.2.layer.0.SelfAttention.o") == \
        "lora_te3_encoder_block_2_layer_0_SelfAttention_o"


def test_parameter_totals_match_the_models():
    """Sum of adapted Linear weights ≈ the published transformer sizes (the
    tables hold every Linear of the blocks, so they land just under them)."""
    def billions(family, variant):
        arch = build(family, variant)
        return sum(math.prod(s) for n, s in arch.shapes.items() if n.startswith("lora_unet_")) / 1e9

    assert 7.5 < billions("sd3", "large") < 8.1       # SD3.5 Large: 8.1B
    assert 1.9 < billions("sd3", "medium") < 2.1      # SD3 Medium: 2B
    assert 2.2 < billions("sd3", "3.5-medium") < 2.5  # SD3.5 Medium: 2.5B
    assert 19 < billions("qwen_image", "base") < 20.5  # Qwen-Image: 20B
    assert 5.8 < billions("z_image", "base") < 6.2    # Z-Image: 6B
    assert 1.2 < billions("wan", "1.3b") < 1.45
    assert 13 < billions("wan", "14b") < 14.5
    assert 4.5 < billions("wan", "5b") < 5.1
    assert 16.5 < billions("hidream", "i1") < 17.2  # HiDream-I1: 17B
