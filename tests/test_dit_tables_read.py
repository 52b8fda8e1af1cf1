"""Synthetic SD3/SD3.5, Qwen-Image, Z-Image and Wan LoRAs in every trainer's
naming: read with the right family and variant, every module, exact ΔW
(against the dense product of the factors written), and a file against its
conversion to another naming (fused ↔ split) at φ = 1 on every module."""
import pytest
import torch
from safetensors.torch import save_file

from core.arch import build
from core.arch.synthetic import FORMATS, random_fused, random_parts, sample_names, tensors
from core.errors import LoraError
from core.formats import load_lora, open_lora
from core.formats.reader import require_same_family
from core.similarity import compare
from tests.lora_reference import one_thread  # noqa: F401 (autouse fixture)

COLS = slice(0, 48)  # ΔW compared on a column slice: fused weights reach 15360 × 5120
CASES = [("sd3", "large"), ("sd3", "3.5-medium"), ("qwen_image", "base"), ("z_image", "base"),
         ("wan", "14b"), ("wan", "1.3b-i2v")]


def _write(tmp_path, lora, fmt, tag=""):
    path = tmp_path / f"{lora.arch.family}-{lora.arch.variant}-{fmt}{tag}.safetensors"
    save_file(tensors(lora, fmt), str(path))
    return str(path)


def _assert_same_delta(read, lora):
    assert set(read.modules) == set(lora.modules)
    for name in lora.modules:
        m = read.modules[name]
        assert m.weight_shape == lora.arch.shapes[name], name
        ref = lora.delta(name, COLS)
        got = m.scale * m.up.double() @ m.down[:, COLS].double()
        err = (got - ref).abs().max().item()
        assert err <= 1e-6 * ref.abs().max().item(), (name, err)


@pytest.fixture(scope="module", params=CASES, ids=lambda c: "-".join(c))
def case(request):
    family, variant = request.param
    arch = build(family, variant)
    names = sample_names(arch, text_encoder=False)  # text encoders: test_text_encoders
    # kohya-trained (one factor pair per fused module) and diffusers-trained (one per split part)
    return arch, random_fused(arch, names, rank=3, seed=1), random_parts(arch, names, rank=2, seed=2)


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_every_format(tmp_path, case, fmt):
    arch, fused, parts = case
    for lora in (fused, parts):
        path = _write(tmp_path, lora, fmt)
        with open_lora(path) as reader:
            assert (reader.family, reader.variant) == (arch.family, arch.variant), reader.family_reason
        read = load_lora(path)
        assert read.family == arch.family
        assert not [w for w in read.warnings if "not in the" in w], read.warnings
        _assert_same_delta(read, lora)


def test_split_modules_keep_part_ranks(tmp_path, case):
    """A diffusers file's fused module has rank Σ parts (block-diagonal up), never dense."""
    arch, _, parts = case
    read = load_lora(_write(tmp_path, parts, "diffusers"))
    split = [n for n in parts.modules if n in arch.split_parts]
    assert split or arch.family in ("qwen_image", "wan")
    for name in split:
        distinct = len({p[0] for p in arch.split_parts[name]})
        assert read.modules[name].factor_rank == 2 * distinct


def test_partly_covered_fused_module_is_zero_elsewhere(tmp_path, case):
    """A LoRA on to_k alone (no to_q, to_v) is the k rows of the fused qkv; the rest is zero."""
    arch, _, parts = case
    split = [n for n in parts.modules if n in arch.split_parts and len(arch.split_parts[n]) == 3]
    if not split:
        pytest.skip(f"{arch.family} has no split qkv")
    name = split[0]
    alias, start, end, _ = arch.split_parts[name][1]
    t = {k: v for k, v in tensors(parts, "diffusers").items() if k.startswith(f"transformer.{alias}.")}
    path = tmp_path / "only_k.safetensors"
    save_file(t, str(path))
    m = load_lora(str(path)).modules[name]
    got = m.scale * m.up.double() @ m.down.double()[:, COLS]
    ref = parts.delta(name, COLS)
    assert got[:start].abs().max() == 0 and got[end:].abs().max() == 0
    torch.testing.assert_close(got[start:end], ref[start:end], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("pair", [("kohya", "diffusers"), ("comfyui", "onetrainer"), ("kohya", "diffsynth"),
                                  ("diffusers", "lycoris")])
def test_file_against_its_conversion_phi_one(tmp_path, case, pair):
    """The same ΔW in two namings (LDM fused vs diffusers split) lines up
    module for module: φ = 1 everywhere, on both sides."""
    arch, fused, parts = case
    for lora, tag in ((fused, "f"), (parts, "p")):
        a = load_lora(_write(tmp_path, lora, pair[0], tag))
        b = load_lora(_write(tmp_path, lora, pair[1], tag))
        report = compare(a, b, side="both")
        assert len(report.results) == 2 * len(lora.modules)
        assert all(r.live and r.phi == pytest.approx(1.0, abs=1e-6) for r in report.results), \
            [(r.module, r.side, r.phi) for r in report.results if not r.live or abs(r.phi - 1) > 1e-6][:4]


@pytest.mark.parametrize("family,variant", [("sd3", "medium"), ("sd3", "3.5-medium"), ("sd3", "large"),
                                            ("wan", "1.3b"), ("wan", "5b"), ("wan", "14b-i2v")])
def test_variant_from_shapes(tmp_path, family, variant):
    """The variant is the table the modules fit: widths, and the parts only
    some variants have (SD3.5 Medium's 9-way x_block modulation, Wan I2V's k_img)."""
    arch = build(family, variant)
    names = [n for n in sample_names(arch, text_encoder=False)
             if n.endswith(("x_block_adaLN_modulation_1", "attn_qkv", "cross_attn_k_img", "ffn_0",
                            "head_head"))]
    for fmt in ("kohya", "diffusers"):
        with open_lora(_write(tmp_path, random_fused(arch, names, rank=2), fmt)) as reader:
            assert (reader.family, reader.variant) == (family, variant), reader.family_reason


# (family, variant, kohya name of one text-encoder module, {format: how that format spells it})
TEXT_ENCODERS = [
    ("sd3", "large", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
     {"comfyui": "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj",
      "diffusers": "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"}),
    ("sd3", "large", "lora_te2_text_model_encoder_layers_31_mlp_fc2",
     {"comfyui": "text_encoders.clip_g.transformer.text_model.encoder.layers.31.mlp.fc2",
      "diffusers": "text_encoder_2.text_model.encoder.layers.31.mlp.fc2"}),
    ("sd3", "large", "lora_te3_encoder_block_3_layer_1_DenseReluDense_wi_1",
     {"comfyui": "text_encoders.t5xxl.transformer.encoder.block.3.layer.1.DenseReluDense.wi_1",
      "diffusers": "text_encoder_3.encoder.block.3.layer.1.DenseReluDense.wi_1"}),
    ("qwen_image", "base", "lora_te_layers_2_self_attn_k_proj",
     {"comfyui": "text_encoders.qwen25_7b.transformer.model.layers.2.self_attn.k_proj"}),
    ("z_image", "base", "lora_te_layers_35_mlp_down_proj",
     {"comfyui": "text_encoders.qwen3_4b.transformer.model.layers.35.mlp.down_proj"}),
    ("wan", "14b", "lora_te_encoder_block_0_layer_0_SelfAttention_o",
     {"comfyui": "text_encoders.umt5xxl.transformer.encoder.block.0.layer.0.SelfAttention.o",
      "diffusers": "text_encoder.encoder.block.0.layer.0.SelfAttention.o"}),
]


@pytest.mark.parametrize("family,variant,kohya,spellings", TEXT_ENCODERS)
def test_text_encoders(tmp_path, family, variant, kohya, spellings):
    """Text-encoder modules beside the diffusion model, in kohya naming, in
    ComfyUI's own (``text_encoders.<encoder>.transformer.…``) and diffusers':
    one module, exact ΔW."""
    arch = build(family, variant)
    unet = [n for n in sample_names(arch, text_encoder=False) if arch.groups[n][-1].isdigit()][:4]
    lora = random_fused(arch, unet + [kohya], rank=2, seed=5)
    for fmt, spelled in (("kohya", kohya), *spellings.items()):
        t = {k.replace(kohya + ".", spelled + "."): v for k, v in tensors(lora, fmt).items()}
        path = tmp_path / f"te-{fmt}.safetensors"
        save_file(t, str(path))
        read = load_lora(str(path))
        assert read.family == family and not read.warnings, (fmt, read.warnings)
        _assert_same_delta(read, lora)


def test_families_do_not_mix(tmp_path):
    sd3 = build("sd3", "large")
    wan = build("wan", "14b")
    a = load_lora(_write(tmp_path, random_fused(sd3, sample_names(sd3, text_encoder=False)[:12]), "kohya"))
    b = load_lora(_write(tmp_path, random_fused(wan, sample_names(wan, text_encoder=False)[:12]), "diffusers"))
    with pytest.raises(LoraError, match="different base models"):
        require_same_family([a, b])


# -- detection of files that name only generic diffusers attention ----------------

def _attention_only(arch, blocks, parts=("to_q", "to_k", "to_v")):
    """Diffusers-named attention q/k/v of the given blocks (what a minimal PEFT config trains)."""
    names = []
    for name, split in arch.split_parts.items():
        for alias, *_ in split:
            if any(alias.endswith(f"attn.{p}") for p in parts) and int(alias.split(".")[1]) in blocks:
                names.append(name)
    whole = [n for n in arch.shapes if any(arch.canonical(f"transformer_blocks.{b}.attn.{p}") == n
                                           for b in blocks for p in parts)]
    return list(dict.fromkeys(names + whole))


@pytest.mark.parametrize("family,variant,blocks,read_as", [
    ("sd3", "large", range(38), "large"), ("sd3", "medium", range(3), "3.5-medium"),
    ("qwen_image", "base", range(60), "base"), ("qwen_image", "base", range(30, 40), "base")])
def test_generic_attention_files_detected(tmp_path, family, variant, blocks, read_as):
    """transformer_blocks.N.attn.to_q/k/v names Flux, SD3 and Qwen-Image alike:
    widths (SD3 1536/2432) and depth (Qwen-Image beyond Flux's 19 blocks) decide.
    Attention alone cannot tell SD3 Medium from SD3.5 Medium (same shapes):
    the preferred variant, 3.5, is reported."""
    arch = build(family, variant)
    lora = random_parts(arch, _attention_only(arch, set(blocks)), rank=2)
    assert lora.modules
    for fmt in ("diffusers", "diffsynth"):
        with open_lora(_write(tmp_path, lora, fmt)) as reader:
            assert (reader.family, reader.variant) == (family, read_as), reader.family_reason
