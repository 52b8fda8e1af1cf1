"""Flux.1 (dev, schnell, Chroma) and Flux.2 Klein: every trainer's format reads
to the same fused modules with the exact ΔW, files line up with their own
conversions (φ = 1), merges across formats equal merges of the converted."""
import math

import pytest
import torch
from safetensors.torch import save_file

from core.errors import LoraError
from core.formats import load_lora, open_lora
from core.merge import merge
from core.save import save_kohya
from core.sdarch import arch_for
from core.similarity import compare
from core.synthetic import random_lora
from tests import dit_files
from tests.lora_reference import one_thread  # noqa: F401 (autouse fixture)

COLS = 48  # ΔW compared on a column slice: fused weights reach 27648×3072
CASES = [("flux", "dev"), ("flux", "chroma"), ("flux2", "klein-4b"), ("flux2", "klein-9b")]


def _dense(m, cols=COLS):
    return m.scale * m.up.double() @ m.down.double()[:, :cols]


def assert_same_delta(got, want):
    assert set(got.modules) == set(want)
    for name in want:
        torch.testing.assert_close(_dense(got.modules[name]), _dense(want[name]), rtol=1e-6, atol=1e-12)


@pytest.fixture(scope="module")
def sources():
    out = {}
    for family, variant in CASES:
        names = dit_files.sample_names(family, variant)
        out[family, variant] = dit_files.random_dit_lora(family, variant, names, rank=2, seed=len(out))
    return out


@pytest.mark.parametrize("family,variant", CASES)
@pytest.mark.parametrize("fmt", dit_files.FORMATS)
def test_every_format_reads_exactly(tmp_path, sources, family, variant, fmt):
    src = sources[family, variant]
    path = dit_files.write(src, family, variant, fmt, tmp_path / f"{fmt}.safetensors")
    lora = load_lora(path)
    assert (lora.family, lora.modules and True) == (family, True), lora.warnings
    want = {n: src.modules[n] for n in dit_files.expected_modules(src, fmt)}
    assert_same_delta(lora, want)
    assert not [w for w in lora.warnings if "not in the" in w], lora.warnings
    table = arch_for(family, variant)
    for name, m in lora.modules.items():  # full weight shapes of the real model
        assert m.weight_shape == table.shapes[name]


@pytest.mark.parametrize("family,variant", CASES)
def test_variant_detected(tmp_path, sources, family, variant):
    from core.formats import open_lora
    src = sources[family, variant]
    for fmt in ("kohya", "peft"):
        with open_lora(dit_files.write(src, family, variant, fmt, tmp_path / f"{fmt}.safetensors")) as r:
            assert (r.family, r.variant) == (family, variant)


def test_full_depth_module_count(tmp_path):
    table = arch_for("flux", "dev")
    assert sum(n.startswith("lora_unet_") for n in table.shapes) == 19 * 10 + 38 * 3 + 10
    src = dit_files.random_dit_lora("flux", "dev", list(table.shapes), rank=1)
    lora = load_lora(dit_files.write(src, "flux", "dev", "peft", tmp_path / "all.safetensors"))
    assert len(lora.modules) == len(table.shapes) == 554
    assert lora.modules["lora_unet_single_blocks_37_linear1"].factor_rank == 4  # q, k, v, mlp parts


@pytest.mark.parametrize("fmt", ["peft", "lycoris_loha", "onetrainer"])
def test_file_lines_up_with_its_own_conversion(tmp_path, sources, fmt):
    src = sources["flux", "dev"]
    lora = load_lora(dit_files.write(src, "flux", "dev", fmt, tmp_path / f"{fmt}.safetensors"))
    converted = load_lora(save_kohya(lora, str(tmp_path / "converted.safetensors")))
    assert converted.family == "flux"
    report = compare(lora, converted, side="both")
    assert not report.only_in_a and not report.only_in_b
    assert len({r.module for r in report.results}) == len(lora.modules)
    for r in report.results:
        assert r.live and r.phi == pytest.approx(1.0, abs=1e-6), (r.module, r.side, r.phi)


@pytest.mark.parametrize("method", ["svd", "karcher"])
def test_merge_across_formats_equals_merge_of_converted(tmp_path, method):
    names = dit_files.sample_names("flux", "dev")[:30]
    a = dit_files.random_dit_lora("flux", "dev", names, rank=3, seed=10)
    b = dit_files.random_dit_lora("flux", "dev", names, rank=2, seed=11)
    fa = load_lora(dit_files.write(a, "flux", "dev", "kohya", tmp_path / "a.safetensors"))
    fb = load_lora(dit_files.write(b, "flux", "dev", "peft", tmp_path / "b.safetensors"))
    fb_kohya = load_lora(save_kohya(fb, str(tmp_path / "b_kohya.safetensors")))
    mixed = merge([fa, fb], method=method, rank=2)
    same = merge([fa, fb_kohya], method=method, rank=2)
    assert set(mixed.lora.modules) == set(same.lora.modules) == set(names)
    for name in names:
        torch.testing.assert_close(_dense(mixed.lora.modules[name]), _dense(same.lora.modules[name]),
                                   rtol=1e-4, atol=1e-9)


def test_mixed_families_one_line_error(tmp_path, sources):
    flux = load_lora(dit_files.write(sources["flux", "dev"], "flux", "dev", "kohya", tmp_path / "f.safetensors"))
    sdxl = random_lora("sdxl", rank=2, limit=4)
    with pytest.raises(LoraError) as err:
        merge([flux, sdxl], method="svd")
    msg = str(err.value)
    assert "\n" not in msg and "different base models" in msg and "Flux.1" in msg and "SDXL" in msg


def test_klein_shapes_differ_from_flux1():
    # the gated MLP makes Klein 4B's single-block linear1 9×3072 rows, Flux.1's 7×3072
    assert arch_for("flux2", "klein-4b").shapes["lora_unet_single_blocks_0_linear1"] == (9 * 3072, 3072)
    assert arch_for("flux", "dev").shapes["lora_unet_single_blocks_0_linear1"] == (7 * 3072, 3072)
    assert arch_for("flux2", "klein-9b").shapes["lora_unet_double_blocks_7_img_mlp_2"] == (4096, 3 * 4096)
    assert math.prod(arch_for("flux", "dev").shapes["lora_unet_txt_in"]) == 3072 * 4096


def test_lazy_sources_merge_like_loaded_ones(tmp_path):
    """load_lora(lazy=True): modules read from the open file on access (bounded memory)."""
    names = dit_files.sample_names("flux", "dev")[:20]
    a = dit_files.random_dit_lora("flux", "dev", names, rank=3, seed=1)
    b = dit_files.random_dit_lora("flux", "dev", names, rank=2, seed=2)
    pa = dit_files.write(a, "flux", "dev", "kohya", tmp_path / "a.safetensors")
    pb = dit_files.write(b, "flux", "dev", "peft", tmp_path / "b.safetensors")
    lazy = [load_lora(pa, lazy=True), load_lora(pb, lazy=True)]
    assert set(lazy[1].modules) == set(names) and lazy[1].family == "flux"
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert qkv in names and lazy[1].modules[qkv] is not lazy[1].modules[qkv]  # read anew, not kept
    eager = merge([load_lora(pa), load_lora(pb)], method="svd", rank=2)
    merged = merge(lazy, method="svd", rank=2)
    for name in names:
        torch.testing.assert_close(_dense(merged.lora.modules[name]), _dense(eager.lora.modules[name]),
                                   rtol=1e-6, atol=1e-12)


def test_klein_text_encoders_are_qwen3():
    """Klein 4B/9B carry Qwen3-4B/8B (36 layers, GQA 32 query / 8 key-value heads of
    128), spelled as ComfyUI holds them (qwen3_4b / qwen3_8b.transformer.model.…)."""
    for variant, comfy, width, inter in (("klein-4b", "qwen3_4b", 2560, 9728), ("klein-9b", "qwen3_8b", 4096, 12288)):
        table = arch_for("flux2", variant)
        te = [n for n in table.shapes if not n.startswith("lora_unet_")]
        assert len(te) == 36 * 7 and all(n.startswith("lora_te_layers_") for n in te)
        assert table.shapes["lora_te_layers_35_self_attn_q_proj"] == (32 * 128, width)
        assert table.shapes["lora_te_layers_0_self_attn_k_proj"] == (8 * 128, width)
        assert table.shapes["lora_te_layers_0_mlp_down_proj"] == (width, inter)
        assert table.canonical(f"{comfy}.transformer.model.layers.7.mlp.gate_proj") == "lora_te_layers_7_mlp_gate_proj"


def _kohya_file(path, family, variant, names, metadata=None):
    src = dit_files.random_dit_lora(family, variant, names)
    tensors = dit_files.format_tensors(src, family, variant, "kohya")
    save_file({k: v.clone() for k, v in tensors.items()}, str(path), metadata)
    return str(path)


def test_text_encoders_do_not_sway_the_family(tmp_path):
    """Double-block attention of width 3072 fits Flux.1 dev and Klein 4B alike; a
    Qwen3-4B text encoder (Klein 4B's) beside it must not decide: the file reads
    as the same attention without it does. Files of encoder layers alone are
    fitted by them (the variant from the encoder's width)."""
    unet = [f"lora_unet_double_blocks_{i}_{s}_attn_{m}" for i in (0, 4) for s in ("img", "txt")
            for m in ("qkv", "proj")]
    klein = arch_for("flux2", "klein-4b")
    assert all(klein.shapes[n] == arch_for("flux", "dev").shapes[n] for n in unet)
    te = [n for n in klein.shapes if n.startswith("lora_te_layers_")][:70]
    alone = open_lora(_kohya_file(tmp_path / "unet.safetensors", "flux2", "klein-4b", unet))
    both = open_lora(_kohya_file(tmp_path / "both.safetensors", "flux2", "klein-4b", unet + te))
    with alone, both:
        assert (both.family, both.variant) == (alone.family, alone.variant) == ("flux", "dev"), both.family_reason
    claim = {"modelspec.architecture": "flux-2-klein-9b"}
    for variant in ("klein-4b", "klein-9b"):
        names = [n for n in arch_for("flux2", variant).shapes if n.startswith("lora_te_layers_1_")]
        with open_lora(_kohya_file(tmp_path / f"{variant}.safetensors", "flux2", variant, names, claim)) as reader:
            assert (reader.family, reader.variant) == ("flux2", variant), reader.family_reason


def test_hunyuan_video_is_not_flux(tmp_path):
    """HunyuanVideo's double/single blocks have Flux's names and widths in kohya
    spelling (img_attn_qkv, linear1), but musubi-tuner and diffusion-pipe keep the
    original img_mlp.fc1 / img_mod.linear / modulation.linear: such a file is
    HunyuanVideo (no table: kohya names as spelled), and merging it with a Flux
    LoRA is a one-line error, not a merge of unrelated layers."""
    h, mlp = 3072, 12288
    g = torch.Generator().manual_seed(0)
    t = {}
    for stem, d_out, d_in in (("double_blocks_0_img_attn_qkv", 3 * h, h), ("double_blocks_0_img_mlp_fc1", mlp, h),
                              ("double_blocks_0_txt_mod_linear", 6 * h, h), ("single_blocks_0_linear1", 3 * h + mlp, h),
                              ("single_blocks_39_modulation_linear", 3 * h, h)):
        t[f"lora_unet_{stem}.lora_down.weight"] = torch.randn(2, d_in, generator=g)
        t[f"lora_unet_{stem}.lora_up.weight"] = torch.randn(d_out, 2, generator=g)
    save_file(t, str(tmp_path / "hv.safetensors"))
    hv = load_lora(str(tmp_path / "hv.safetensors"))
    assert hv.family == "hunyuan_video"
    assert "lora_unet_double_blocks_0_img_attn_qkv" in hv.modules and len(hv.modules) == 5
    names = ["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"]
    flux = load_lora(dit_files.write(dit_files.random_dit_lora("flux", "dev", names), "flux", "dev", "kohya",
                                     tmp_path / "flux.safetensors"))
    with pytest.raises(LoraError) as err:
        merge([flux, hv], method="concat")
    assert "\n" not in str(err.value) and "Flux.1" in str(err.value) and "HunyuanVideo" in str(err.value)
