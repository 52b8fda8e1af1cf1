"""Synthetic SD3/SD3.5, Qwen-Image, Z-Image and Wan LoRAs in every trainer's
naming (tests/dit_files.py): read with the right family and variant, every
module, exact ΔW against the dense product of the factors written; a file
against its conversion to another naming (fused ↔ split) at φ = 1 on every
module. Two kinds of source: kohya-trained (one factor pair per fused module)
and diffusers-trained (independent factors per split part: q, k, v)."""
import re

import pytest
import torch
from safetensors.torch import save_file

from core.errors import LoraError
from core.formats import load_lora, open_lora
from core.formats.reader import require_same_family
from core.lora import LoraFile, LoraModule
from core.merge import merge
from core.save import save_kohya
from core.sdarch import arch_for
from core.similarity import compare
from tests import dit_files
from tests.lora_reference import one_thread  # noqa: F401 (autouse fixture)

COLS = 48  # ΔW compared on a column slice: fused weights reach 15360 × 5120
CASES = [("sd3", "large"), ("sd3", "3.5-medium"), ("qwen_image", "base"), ("z_image", "base"),
         ("wan", "14b"), ("wan", "1.3b-i2v"), ("hidream", "i1")]


def random_parts(family: str, variant: str, names: list[str], rank: int = 2, seed: int = 0) -> LoraFile:
    """A diffusers-trained LoRA: independent rank-``rank`` factors per split part
    (part j's rows from the j-th random LoRA), held fused as the readers fuse
    it: block-diagonal up, stacked down."""
    table = arch_for(family, variant)
    draws = [dit_files.random_dit_lora(family, variant, names, rank, seed + j) for j in range(4)]
    lora = LoraFile(f"{family}-parts-{seed}.safetensors", "peft", family)
    for name in names:
        m = draws[0].modules[name]
        parts: dict[str, list] = {}
        for alias, start, end, first in table.split_parts.get(name, [(name, 0, m.d_out, 0)]):
            parts.setdefault(alias, []).append((start, end))
        ups, downs = [], []
        for j, rows in enumerate(parts.values()):
            up = torch.zeros_like(draws[j].modules[name].up)
            for start, end in rows:  # a swapped part: any rows of a random up are random
                up[start:end] = draws[j].modules[name].up[start:end]
            ups.append(up)
            downs.append(draws[j].modules[name].down)
        up, down = torch.cat(ups, 1), torch.cat(downs, 0)
        lora.modules[name] = LoraModule(name, up, down, 1.0, down.shape[0], float(down.shape[0]), m.weight_shape)
    return lora


def _dense(m, cols=COLS):
    return m.scale * m.up.double() @ m.down[:, :cols].double()


def _assert_same_delta(got: LoraFile, want: dict[str, LoraModule], family: str, variant: str):
    assert set(got.modules) == set(want)
    table = arch_for(family, variant)
    for name, w in want.items():
        m = got.modules[name]
        assert m.weight_shape == table.shapes[name], name
        ref = _dense(w)
        err = (_dense(m) - ref).abs().max().item()
        assert err <= 1e-6 * ref.abs().max().item(), (name, err)


@pytest.fixture(scope="module", params=CASES, ids=lambda c: "-".join(c))
def case(request):
    family, variant = request.param
    # HiDream's routed experts 1-3 are spelled and shaped as expert 0: left out for time
    names = [n for n in dit_files.sample_names(family, variant) if not re.search(r"_experts_[1-9]_", n)]
    unet = [n for n in names if n.startswith("lora_unet_")]
    return (family, variant, dit_files.random_dit_lora(family, variant, names, rank=3, seed=1),
            random_parts(family, variant, unet, rank=2, seed=2))


@pytest.mark.parametrize("fmt", dit_files.FORMATS)
def test_read_every_format(tmp_path, case, fmt):
    family, variant, fused, parts = case
    for i, src in enumerate((fused, parts)):
        path = dit_files.write(src, family, variant, fmt, tmp_path / f"{fmt}{i}.safetensors")
        with open_lora(path) as reader:
            assert (reader.family, reader.variant) == (family, variant), reader.family_reason
        lora = load_lora(path)
        assert not [w for w in lora.warnings if "not in the" in w], lora.warnings
        _assert_same_delta(lora, {n: src.modules[n] for n in dit_files.expected_modules(src, fmt)},
                           family, variant)


def test_split_modules_keep_part_ranks(tmp_path, case):
    """A diffusers file's fused module has rank Σ parts (block-diagonal up), never dense."""
    family, variant, _, parts = case
    table = arch_for(family, variant)
    lora = load_lora(dit_files.write(parts, family, variant, "peft", tmp_path / "p.safetensors"))
    split = [n for n in parts.modules if n in table.split_parts]
    assert split or family in ("qwen_image", "wan", "hidream")  # nothing fused there
    for name in split:
        distinct = len({p[0] for p in table.split_parts[name]})
        assert lora.modules[name].factor_rank == 2 * distinct


def test_partly_covered_fused_module_is_zero_elsewhere(tmp_path, case):
    """A LoRA on to_k alone (no to_q, to_v) is the k rows of the fused qkv; the rest is zero."""
    family, variant, _, parts = case
    table = arch_for(family, variant)
    split = [n for n in parts.modules if len(table.split_parts.get(n, ())) == 3]
    if not split:
        pytest.skip(f"{family} has no split qkv")
    name = split[0]
    alias, start, end, _ = table.split_parts[name][1]
    t = {k: v for k, v in dit_files.format_tensors(parts, family, variant, "peft").items()
         if k.startswith(f"transformer.{alias}.")}
    path = tmp_path / "only_k.safetensors"
    save_file(t, str(path))
    got = _dense(load_lora(str(path)).modules[name])
    ref = _dense(parts.modules[name])
    assert got[:start].abs().max() == 0 and got[end:].abs().max() == 0
    torch.testing.assert_close(got[start:end], ref[start:end], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("pair", [("kohya", "peft"), ("comfyui", "lycoris_loha"), ("onetrainer", "diffsynth")])
def test_file_against_its_conversion_phi_one(tmp_path, case, pair):
    """The same ΔW in two namings (LDM fused vs diffusers split) lines up
    module for module: φ = 1 everywhere, on both sides."""
    family, variant, fused, parts = case
    for i, src in enumerate((fused, parts)):
        a, b = (load_lora(dit_files.write(src, family, variant, fmt, tmp_path / f"{fmt}{i}.safetensors"))
                for fmt in pair)
        shared = dit_files.expected_modules(src, pair[0]) & dit_files.expected_modules(src, pair[1])
        report = compare(a, b, side="both", modules=sorted(shared))
        assert len(report.results) == 2 * len(shared)
        assert all(r.live and r.phi == pytest.approx(1.0, abs=1e-6) for r in report.results), \
            [(r.module, r.side, r.phi) for r in report.results if not r.live or abs(r.phi - 1) > 1e-6][:4]


@pytest.mark.parametrize("family,variant", [("sd3", "medium"), ("sd3", "3.5-medium"), ("sd3", "large"),
                                            ("wan", "1.3b"), ("wan", "5b"), ("wan", "14b-i2v")])
def test_variant_from_shapes(tmp_path, family, variant):
    """The variant is the table the modules fit: widths, and the parts only
    some variants have (SD3.5 Medium's 9-way x_block modulation, Wan I2V's k_img)."""
    names = [n for n in dit_files.sample_names(family, variant)
             if n.endswith(("x_block_adaLN_modulation_1", "attn_qkv", "cross_attn_k_img", "ffn_0", "head_head"))]
    src = dit_files.random_dit_lora(family, variant, names)
    for fmt in ("kohya", "peft"):
        with open_lora(dit_files.write(src, family, variant, fmt, tmp_path / f"{fmt}.safetensors")) as reader:
            assert (reader.family, reader.variant) == (family, variant), reader.family_reason


def _attention_only(family: str, variant: str, blocks) -> list[str]:
    """The modules behind diffusers' transformer_blocks.N.attn.to_q/to_k/to_v
    (what a minimal PEFT config trains)."""
    table = arch_for(family, variant)
    out = []
    for b in blocks:
        for p in ("to_q", "to_k", "to_v"):
            alias = f"transformer_blocks.{b}.attn.{p}"
            out.append(table.canonical(alias) or table.split_of(alias)[0])
    return list(dict.fromkeys(out))


@pytest.mark.parametrize("family,variant,blocks,read_as", [
    ("sd3", "large", range(38), "large"), ("sd3", "medium", range(3), "3.5-medium"),
    ("qwen_image", "base", range(60), "base"), ("qwen_image", "base", range(30, 40), "base")])
def test_generic_attention_files_detected(tmp_path, family, variant, blocks, read_as):
    """transformer_blocks.N.attn.to_q/k/v names Flux, SD3 and Qwen-Image alike:
    widths (SD3 1536/2432) and depth (Qwen-Image beyond Flux's 19 blocks) decide.
    Attention alone cannot tell SD3 Medium from SD3.5 Medium (same shapes):
    the preferred variant, 3.5, is reported."""
    src = random_parts(family, variant, _attention_only(family, variant, blocks))
    for fmt in ("peft", "diffsynth"):
        with open_lora(dit_files.write(src, family, variant, fmt, tmp_path / f"{fmt}.safetensors")) as reader:
            assert (reader.family, reader.variant) == (family, read_as), reader.family_reason


@pytest.mark.parametrize("family,variant", [("sd3", "3.5-medium"), ("z_image", "base"), ("wan", "1.3b")])
def test_merge_across_formats_equals_merge_of_converted(tmp_path, family, variant):
    """A kohya file merged with a diffusers-trained file (split q/k/v) equals the
    merge of the kohya file with that file converted to kohya naming."""
    names = [n for n in dit_files.sample_names(family, variant) if n.startswith("lora_unet_")][:24]
    a = dit_files.random_dit_lora(family, variant, names, rank=3, seed=10)
    b = random_parts(family, variant, names, rank=2, seed=11)
    fa = load_lora(dit_files.write(a, family, variant, "kohya", tmp_path / "a.safetensors"))
    fb = load_lora(dit_files.write(b, family, variant, "peft", tmp_path / "b.safetensors"))
    fb_kohya = load_lora(save_kohya(fb, str(tmp_path / "b_kohya.safetensors")))
    mixed, same = (merge([fa, other], method="svd", rank=2).lora for other in (fb, fb_kohya))
    assert set(mixed.modules) == set(same.modules) == set(names)
    for name in names:
        torch.testing.assert_close(_dense(mixed.modules[name]), _dense(same.modules[name]), rtol=1e-4, atol=1e-9)


def test_families_do_not_mix(tmp_path):
    a, b = (load_lora(dit_files.write(
        dit_files.random_dit_lora(f, v, dit_files.sample_names(f, v)[:12]), f, v, fmt,
        tmp_path / f"{f}.safetensors")) for f, v, fmt in (("sd3", "large", "kohya"), ("wan", "14b", "peft")))
    with pytest.raises(LoraError, match="different base models"):
        require_same_family([a, b])


def test_wan_fun_double_underscore_prefix(tmp_path):
    """VideoX-Fun's Wan LoRAs spell kohya names ``lora_unet__blocks_0_…`` (ComfyUI's
    lora_convert turns ``lora_unet__`` into ``lora_unet_``): same modules, same ΔW."""
    names = ["lora_unet_blocks_0_cross_attn_k", "lora_unet_blocks_39_ffn_2"]
    src = dit_files.random_dit_lora("wan", "14b", names, rank=2)
    tensors = {k.replace("lora_unet_", "lora_unet__", 1): v
               for k, v in dit_files.format_tensors(src, "wan", "14b", "kohya").items()}
    save_file(tensors, str(tmp_path / "fun.safetensors"))
    lora = load_lora(str(tmp_path / "fun.safetensors"))
    assert lora.family == "wan" and not lora.warnings
    _assert_same_delta(lora, src.modules, "wan", "14b")


def test_ltx_video_is_read_untabled(tmp_path):
    """LTX-Video's top-level transformer_blocks.N.attn1/attn2 (width 2048) share
    diffusers names with SD3.5 Medium's attn2 and an SDXL cross-attention width:
    the file is LTX-Video, read with kohya names and no shape check (README),
    not refused as a contradicted SD3 table nor taken for SDXL."""
    g = torch.Generator().manual_seed(0)
    t = {}
    for sub, d_out, d_in in (("attn1.to_q", 2048, 2048), ("attn2.to_k", 2048, 2048), ("ff.net.0.proj", 8192, 2048)):
        key = f"transformer.transformer_blocks.0.{sub}"
        t[f"{key}.lora_A.weight"] = torch.randn(2, d_in, generator=g)
        t[f"{key}.lora_B.weight"] = torch.randn(d_out, 2, generator=g)
    save_file(t, str(tmp_path / "ltx.safetensors"))
    lora = load_lora(str(tmp_path / "ltx.safetensors"))
    assert lora.family == "ltx"
    assert set(lora.modules) == {"lora_unet_transformer_blocks_0_attn1_to_q", "lora_unet_transformer_blocks_0_attn2_to_k",
                                 "lora_unet_transformer_blocks_0_ff_net_0_proj"}
