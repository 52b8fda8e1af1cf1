"""Every naming scheme reads back to the same canonical modules with the same factors.

Synthetic LoRAs with the real SD1.5 / SDXL module names and shapes are written
in each format's own spelling (paths taken from the sdarch alias tables, not
from core.formats), then read with ``load_lora``.
"""
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from core.errors import LoraError
from core.family import detect_family, explain_family, family_from_metadata
from core.formats import FORMATS, canonical_name, load_lora, open_lora, require_same_family
from core.lora import LoraFile
from core.save import save_kohya
from core.sdarch import arch_for
from core.synthetic import random_lora
from tests.lora_reference import comfy_lora_delta, one_thread  # noqa: F401 (autouse fixture)

DIFFUSERS_ROOTS = ("down_blocks", "up_blocks", "mid_block")
LDM_ROOTS = ("input_blocks", "middle_block", "output_blocks")



def spellings(family):
    """canonical -> {'diffusers': dotted path, 'ldm': dotted path, 'te': transformers path,
    'comfy_te': clip_x.transformer path}, read off the sdarch alias table."""
    out = {}
    for alias, canon in arch_for(family).aliases.items():
        if "." not in alias:
            continue
        slot = out.setdefault(canon, {})
        if alias.startswith(DIFFUSERS_ROOTS):
            slot["diffusers"] = alias
        elif alias.startswith(LDM_ROOTS):
            slot["ldm"] = alias
        elif alias.startswith("clip_"):  # 'text_model.…' alone is ambiguous in SDXL (two CLIPs)
            slot["comfy_te"] = alias
            slot["te"] = alias.split(".transformer.", 1)[1]
    return out


def te_prefix(canon, family, diffusers=True):
    if canon.startswith("lora_te2_"):
        return "text_encoder_2."
    return "text_encoder."


def factor_tensors(m, conv_4d=True):
    """(down, up) as a trainer stores them: 4-D for convs (kohya/diffusers LoCon)."""
    down, up = m.down, m.up
    if conv_4d and m.is_conv:
        d_out, c_in, kh, kw = m.weight_shape
        down = down.reshape(-1, c_in, kh, kw)
        up = up.reshape(d_out, -1, 1, 1)
    return down.contiguous(), up.contiguous()


def write(lora, fmt, path, family):
    """Write ``lora`` in naming scheme ``fmt``; returns the metadata used."""
    names = spellings(family)
    t, meta = {}, {}
    for canon, m in lora.modules.items():
        down, up = factor_tensors(m)
        sp = names[canon]
        te = canon.startswith("lora_te")
        if fmt == "diffusers":
            key = (te_prefix(canon, family) + sp["te"]) if te else "unet." + sp["diffusers"]
            t[f"{key}.lora.down.weight"], t[f"{key}.lora.up.weight"] = down, up
        elif fmt == "diffusers-processor":
            head, _, leaf = sp["diffusers"].rpartition(".to_")
            leaf = "to_" + leaf.removesuffix(".0")
            key = f"{head}.processor.{leaf}_lora"
            t[f"{key}.down.weight"], t[f"{key}.up.weight"] = down, up
        elif fmt == "peft":
            key = (te_prefix(canon, family) + "base_model.model." + sp["te"]) if te \
                else "base_model.model." + sp["diffusers"]
            t[f"{key}.lora_A.weight"], t[f"{key}.lora_B.weight"] = down, up
        elif fmt == "comfyui":
            key = "text_encoders." + sp["comfy_te"] if te else "diffusion_model." + sp["ldm"]
            t[f"{key}.lora_down.weight"], t[f"{key}.lora_up.weight"] = down, up
            t[f"{key}.alpha"] = torch.tensor(m.scale * m.rank)
        else:
            raise AssertionError(fmt)
    if fmt == "peft":
        meta["lora_adapter_metadata"] = json.dumps({"lora_alpha": 8, "r": 4})
    save_file(t, str(path), metadata=meta)


def assert_same_modules(got: LoraFile, want: LoraFile, scale=None):
    assert set(got.modules) == set(want.modules)
    for name, w in want.modules.items():
        g = got.modules[name]
        assert torch.equal(g.up, w.up) and torch.equal(g.down, w.down), name
        assert g.scale == pytest.approx(w.scale if scale is None else scale), name
        assert g.weight_shape == w.weight_shape, name


@pytest.fixture(scope="module")
def sd1_locon():
    # alpha = rank → scale 1, which every format can express
    return random_lora("sd1", rank=4, seed=1, conv=True)


@pytest.fixture(scope="module")
def sdxl_lora():
    shapes = list(arch_for("sdxl").shapes)
    names = ([n for n in shapes if n.startswith("lora_unet_")][:200]
             + [n for n in shapes if n.startswith("lora_te1_")][:12]
             + [n for n in shapes if n.startswith("lora_te2_")][:12])
    return random_lora("sdxl", rank=4, seed=2, names=names)


@pytest.mark.parametrize("fmt", ["diffusers", "peft", "comfyui"])
def test_sd1_formats_read_back_identical(tmp_path, sd1_locon, fmt):
    path = tmp_path / f"{fmt}.safetensors"
    write(sd1_locon, fmt, path, "sd1")
    got = load_lora(str(path))
    assert got.format == fmt and got.family == "sd1" and not got.extras
    assert_same_modules(got, sd1_locon, scale=2.0 if fmt == "peft" else None)
    assert got.parts() == sd1_locon.parts()


@pytest.mark.parametrize("fmt", ["diffusers", "peft", "comfyui"])
def test_sdxl_formats_read_back_identical(tmp_path, sdxl_lora, fmt):
    path = tmp_path / f"{fmt}.safetensors"
    write(sdxl_lora, fmt, path, "sdxl")
    got = load_lora(str(path))
    assert got.format == fmt and got.family == "sdxl"
    assert_same_modules(got, sdxl_lora, scale=2.0 if fmt == "peft" else None)


def test_kohya_locon_with_3x3_down_and_1x1_up(tmp_path, sd1_locon):
    path = tmp_path / "kohya.safetensors"
    save_kohya(sd1_locon, str(path))
    got = load_lora(str(path))
    assert got.format == "kohya" and got.family == "sd1"
    assert_same_modules(got, sd1_locon)
    conv = [m for m in got.modules.values() if m.is_conv and m.weight_shape[2:] == (3, 3)]
    assert conv and all(m.d_in == m.weight_shape[1] * 9 for m in conv)


def test_diffusers_processor_names(tmp_path):
    lora = random_lora("sd1", rank=4, seed=3, text_encoder=False,
                       names=[n for n in arch_for("sd1").shapes if "_attn1_" in n or "_attn2_" in n])
    path = tmp_path / "proc.safetensors"
    write(lora, "diffusers-processor", path, "sd1")
    got = load_lora(str(path))
    assert got.format == "diffusers-processor"
    assert_same_modules(got, lora)
    assert any(n.endswith("attn1_to_out_0") for n in got.modules)


def test_lora_mid_folds_into_down(tmp_path):
    """LoCon Tucker: ComfyUI forms down' = (downᵀ·mid) as in comfy/weight_adapter/lora.py."""
    gen = torch.Generator().manual_seed(4)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    r = 4
    down, mid, up = (torch.randn(r, 320, 1, 1, generator=gen), torch.randn(r, r, 3, 3, generator=gen),
                     torch.randn(320, r, 1, 1, generator=gen))
    path = tmp_path / "mid.safetensors"
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_mid.weight": mid,
               f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0)}, str(path),
              metadata={"ss_base_model_version": "sd_v1"})
    m = load_lora(str(path)).modules[name]
    reference = comfy_lora_delta(up, down, alpha=2.0, mid=mid)
    assert m.weight_shape == (320, 320, 3, 3)
    assert torch.allclose(m.delta(), reference, rtol=1e-5, atol=1e-6 * float(reference.abs().max()))


def test_peft_alpha_sources(tmp_path):
    gen = torch.Generator().manual_seed(5)
    key = "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    other = "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
    t = {}
    for k in (key, other):
        t[f"{k}.lora_A.weight"] = torch.randn(8, 768, generator=gen)
        t[f"{k}.lora_B.weight"] = torch.randn(320, 8, generator=gen)
    cases = {
        "none": ({}, {}, (1.0, 1.0)),
        "config": ({"lora_adapter_metadata": json.dumps({"lora_alpha": 16, "r": 8})}, {}, (2.0, 2.0)),
        "rslora": ({"lora_adapter_metadata": json.dumps({"lora_alpha": 16, "use_rslora": True})}, {},
                   (16 / math.sqrt(8), 16 / math.sqrt(8))),
        "pattern": ({"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 8,
                                                          "unet.alpha_pattern": {"attn2.to_v": 32}})}, {},
                    (1.0, 4.0)),
        "tensor": ({"lora_adapter_metadata": json.dumps({"lora_alpha": 16})},
                   {f"{key}.alpha": torch.tensor(4.0)}, (0.5, 2.0)),
    }
    for label, (meta, extra, (s_key, s_other)) in cases.items():
        path = tmp_path / f"{label}.safetensors"
        if label == "pattern":  # component-prefixed config needs component-prefixed keys
            tt = {"unet." + k: v for k, v in t.items()}
        else:
            tt = dict(t)
        save_file({**tt, **extra}, str(path), metadata=meta)
        lora = load_lora(str(path))
        assert lora.format == "peft" and lora.family == "sd1", label
        mods = {n.rsplit("_", 1)[-1]: m for n, m in lora.modules.items()}
        assert mods["k"].scale == pytest.approx(s_key), label
        assert mods["v"].scale == pytest.approx(s_other), label


def test_peft_adapter_config_beside_the_file(tmp_path):
    k = "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    save_file({f"{k}.lora_A.weight": torch.ones(4, 768), f"{k}.lora_B.weight": torch.ones(320, 4)},
              str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"lora_alpha": 2, "r": 4}))
    (m,) = load_lora(str(tmp_path / "adapter_model.safetensors")).modules.values()
    assert m.scale == pytest.approx(0.5) and m.alpha == 2.0


# ---- canonical names ------------------------------------------------------

def test_one_layer_in_every_spelling_has_one_canonical_name():
    sd1 = [
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out",
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "unet.base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_out.0",
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_out_0",
        "lycoris_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0",
    ]
    assert {canonical_name(k, "sd1") for k in sd1} == {
        ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0", True)}
    sdxl = [
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k",
        "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k",
        "diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k",
    ]
    assert {canonical_name(k, "sdxl") for k in sdxl} == {
        ("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k", True)}


def test_text_encoder_slots():
    body = "text_model.encoder.layers.3.mlp.fc1"
    assert canonical_name(f"text_encoder.{body}", "sd1")[0] == "lora_te_text_model_encoder_layers_3_mlp_fc1"
    assert canonical_name(f"text_encoders.clip_l.transformer.{body}", "sd1")[0] == \
        "lora_te_text_model_encoder_layers_3_mlp_fc1"
    assert canonical_name(f"text_encoders.clip_h.transformer.{body}", "sd2") == \
        ("lora_te_text_model_encoder_layers_3_mlp_fc1", True)
    assert canonical_name(f"text_encoder.{body}", "sdxl")[0] == "lora_te1_text_model_encoder_layers_3_mlp_fc1"
    assert canonical_name(f"text_encoder_2.{body}", "sdxl")[0] == "lora_te2_text_model_encoder_layers_3_mlp_fc1"
    assert canonical_name(f"text_encoders.clip_g.transformer.{body}", "sdxl") == \
        ("lora_te2_text_model_encoder_layers_3_mlp_fc1", True)
    # legacy diffusers processor spelling of a CLIP attention projection
    assert canonical_name("text_encoder.text_model.encoder.layers.0.self_attn.processor.to_q", "sd1")[0] \
        == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def test_dit_names_resolve_through_tables():
    # Flux has a table (core.arch.flux): diffusers split parts name their fused LDM module
    assert canonical_name("transformer.single_transformer_blocks.3.attn.to_q", "flux") == \
        ("lora_unet_single_blocks_3_linear1", True)
    assert canonical_name("lora_unet_double_blocks_0_img_attn_qkv", "flux") == \
        ("lora_unet_double_blocks_0_img_attn_qkv", True)
    assert canonical_name("text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q",
                          "flux") == ("lora_te3_encoder_block_0_layer_0_SelfAttention_q", True)
    assert canonical_name("text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1",
                          "flux") == ("lora_te1_text_model_encoder_layers_0_mlp_fc1", True)


def test_flux_file_reads_split_parts_as_fused_modules(tmp_path):
    t = {}
    for k, (o, i) in {"transformer.single_transformer_blocks.0.attn.to_q": (3072, 3072),
                      "transformer.transformer_blocks.0.attn.add_q_proj": (3072, 3072)}.items():
        t[f"{k}.lora_A.weight"], t[f"{k}.lora_B.weight"] = torch.ones(2, i), torch.ones(o, 2)
    save_file(t, str(tmp_path / "flux.safetensors"))
    lora = load_lora(str(tmp_path / "flux.safetensors"))
    assert lora.family == "flux" and lora.format == "peft"
    assert set(lora.modules) == {"lora_unet_single_blocks_0_linear1",
                                 "lora_unet_double_blocks_0_txt_attn_qkv"}
    assert not lora.warnings


# ---- family detection -------------------------------------------------------

def _names_shapes(family, **kw):
    lora = random_lora(family, rank=1, seed=0, **kw)
    return list(lora.modules), {n: m.weight_shape for n, m in lora.modules.items()}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_family_from_shapes(family):
    names, shapes = _names_shapes(family)
    assert detect_family(names, shapes, {}) == family
    # the UNet alone and the text encoder alone decide too
    unet = [n for n in names if n.startswith("lora_unet_")]
    te = [n for n in names if n.startswith("lora_te")]
    assert detect_family(unet, shapes) == family
    assert detect_family(te, shapes) == family


def test_family_from_keys_and_metadata():
    assert detect_family(["lora_unet_double_blocks_0_img_attn_qkv"], {}) == "flux"
    assert detect_family(["transformer.single_transformer_blocks.0.attn.to_k"], {}) == "flux"
    assert detect_family(["lora_unet_joint_blocks_0_context_block_attn_qkv"], {}) == "sd3"
    mmdit = "transformer.transformer_blocks.0.attn.add_k_proj"
    assert detect_family([mmdit], {mmdit: (1536, 1536)}) == "sd3"
    assert detect_family([mmdit], {mmdit: (3072, 3072)}) == "flux"
    # SDXL's deep transformer_blocks sit in a UNet block; a DiT's top-level ones (a diffusers
    # Flux.1 / SD3 / Flux.2 LoRA of MLPs only) are not SDXL, whatever their index
    assert detect_family(["transformer.transformer_blocks.4.ff.net.0.proj"], {}) == "unknown"
    assert detect_family(["unet.down_blocks.2.attentions.1.transformer_blocks.4.ff.net.0.proj"], {}) == "sdxl"
    assert detect_family(["lora_unet_input_blocks_7_1_transformer_blocks_2_attn1_to_q"], {}) == "sdxl"
    # a lone module both SD1 and SDXL have: only metadata can tell
    lone = ["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert detect_family(lone, {}) == "unknown"
    assert detect_family(lone, {}, {"ss_base_model_version": "sdxl_base_v1-0"}) == "sdxl"
    assert detect_family(lone, {}, {"modelspec.architecture": "stable-diffusion-v1/lora"}) == "sd1"
    assert detect_family(lone, {}, {"ss_v2": "True"}) == "sd2"
    # shapes beat contradicting metadata
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert explain_family([k], {k: (320, 1024)}, {"ss_base_model_version": "sd_v1"})[0] == "sd2"
    assert family_from_metadata({"modelspec.architecture": "flux-1-dev/lora"}) == "flux"
    assert family_from_metadata({}) is None


def test_metadata_contradiction_is_reported(tmp_path):
    lora = random_lora("sd2", rank=2, seed=0, limit=12)
    path = tmp_path / "x.safetensors"
    save_kohya(lora, str(path), extra_metadata={"grassmann_lora.family": "sd1",
                                                "ss_base_model_version": "sd_v1"})
    got = load_lora(str(path))
    assert got.family == "sd2" and any("metadata says SD1.x" in w for w in got.warnings)


def test_require_same_family_names_both_files():
    a = LoraFile("/x/a.safetensors", "kohya", "sd1")
    b = LoraFile("/x/b.safetensors", "kohya", "sd2")
    c = LoraFile("/x/c.safetensors", "kohya", "unknown")
    assert require_same_family([a, c, a]) == "sd1"
    with pytest.raises(LoraError) as err:
        require_same_family([a, c, b])
    assert "a.safetensors" in str(err.value) and "b.safetensors" in str(err.value)
    assert "SD1.x" in str(err.value) and "SD2.x" in str(err.value)


# ---- extras, unsupported adapters, streaming ---------------------------------

def test_extras_are_reported_never_dropped_silently(tmp_path, sd1_locon):
    base = tmp_path / "base.safetensors"
    save_kohya(random_lora("sd1", rank=2, seed=9, limit=6), str(base))
    from safetensors.torch import load_file
    t = load_file(str(base))
    name = next(k for k in t if k.endswith(".lora_up.weight")).removesuffix(".lora_up.weight")
    t[f"{name}.dora_scale"] = torch.ones(1, 320)
    t[f"{name}.diff_b"] = torch.ones(320)
    t["bundle_emb.mytoken.string_to_param.*"] = torch.ones(1, 768)
    t["lora_unet_conv_in.diff"] = torch.ones(320, 4, 3, 3)
    t["lora_unet_mid_block_attentions_0_proj_in.oft_blocks"] = torch.ones(4, 320, 320)
    t["something_else"] = torch.ones(3)
    path = tmp_path / "extras.safetensors"
    save_file(t, str(path))
    lora = load_lora(str(path))
    assert len(lora.modules) == 6
    assert set(lora.extras) == {f"{name}.dora_scale", f"{name}.diff_b", "bundle_emb.mytoken.string_to_param.*",
                                "lora_unet_conv_in.diff", "lora_unet_mid_block_attentions_0_proj_in.oft_blocks",
                                "something_else"}
    assert "DoRA" in lora.extras[f"{name}.dora_scale"]
    assert "OFT" in lora.extras["lora_unet_mid_block_attentions_0_proj_in.oft_blocks"]
    assert "Textual-Inversion" in lora.extras["bundle_emb.mytoken.string_to_param.*"]
    text = " ".join(lora.warnings)
    assert "DoRA" in text and "5 tensor(s) are not LoRA weights" in text


def test_only_unsupported_adapters_is_an_error(tmp_path):
    path = tmp_path / "oft.safetensors"
    save_file({"lora_unet_mid_block_attentions_0_proj_in.oft_blocks": torch.ones(4, 80, 80),
               "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(1.0)}, str(path))
    with pytest.raises(LoraError) as err:
        load_lora(str(path))
    assert "OFT" in str(err.value) and "oft.safetensors" in str(err.value)
    assert err.value.key == "lora_unet_mid_block_attentions_0_proj_in.oft_blocks"


def test_open_lora_reads_one_module_at_a_time(tmp_path, sd1_locon):
    path = tmp_path / "stream.safetensors"
    save_kohya(sd1_locon, str(path))
    with open_lora(str(path)) as reader:
        assert reader.names == list(sd1_locon.modules) and reader.family == "sd1"
        name = reader.names[10]
        assert reader.plan(name).weight_shape == sd1_locon.modules[name].weight_shape
        m = reader.read(name)
        assert torch.equal(m.up, sd1_locon.modules[name].up)
        assert sum(1 for _ in reader) == len(sd1_locon.modules)


def test_format_strings_are_documented():
    assert set(FORMATS) == {"kohya", "lycoris-loha", "lycoris-lokr", "lycoris", "diffusers-processor",
                            "diffusers", "peft", "comfyui", "cloneofsimo", "cloneofsimo-pt"}
