"""The real LoRA files in shared/fixtures/real_loras: what their README says,
and every module's factored SVD against ΔW formed straight from the file's
raw tensors (ComfyUI's formulas, tests/lora_reference.py)."""
from collections import Counter

import pytest
import torch
from safetensors import safe_open

from core.device import linalg_threads
from core.factored import module_svd
from core.formats import load_lora
from core.sdarch import arch_for
from tests.lora_reference import (assert_is_svd_of, assert_svd_matches_dense, comfy_lokr_delta,  # noqa: F401
                                  comfy_lora_delta, lokr_apply, one_thread)

# file -> (format, family, parts, ranks, alphas, dead, extras, dtype)
EXPECTED = {
    "catundchat__pytorch_lora_weights.safetensors":
        ("diffusers-processor", "sd1", {"unet": 128}, [4], [], 0, set(), torch.float32),
    "cloneofsimo__analog_svd_rank4_sd15.safetensors":
        ("cloneofsimo", "sd1", {"unet": 144, "te": 48}, [4], [], 0, set(), torch.float16),
    "cloneofsimo__lora_disney_sd15.safetensors":
        ("cloneofsimo", "sd1", {"unet": 144, "te": 48}, [1], [], 0, {"<s1>", "<s2>"}, torch.float32),
    "cloneofsimo__lora_illust_sd2.pt":
        ("cloneofsimo-pt", "sd2", {"unet": 128}, [4], [], 32, set(), torch.float32),
    "cloneofsimo__lora_pop_sd2.pt":
        ("cloneofsimo-pt", "sd2", {"unet": 128}, [4], [], 32, set(), torch.float32),
    "cloneofsimo__lora_kiriko2_sd15.text_encoder.pt":
        ("cloneofsimo-pt", "sd1", {"te": 48}, [4], [], 0, set(), torch.float32),
    "lycoris__smart_falcon_4_lokr.safetensors":
        ("lycoris-lokr", "sd1", {"te": 72, "unet": 278}, [4], [4.0], 3, set(), torch.float16),
    "lycoris__smart_falcon_8_lokr.safetensors":
        ("lycoris-lokr", "sd1", {"te": 72, "unet": 278}, [8], [8.0], 3, set(), torch.float16),
}
LOKR_DEAD = {"lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_0_resnets_0_conv2",
             "lora_unet_down_blocks_0_resnets_0_time_emb_proj"}



@pytest.fixture(scope="module")
def loras(real_loras_dir):
    with linalg_threads(1):
        return {name: load_lora(str(real_loras_dir / name)) for name in EXPECTED}


@pytest.fixture(scope="module")
def svds(loras):
    """file -> module -> factored SVD, computed once."""
    with linalg_threads(1):
        return {name: {n: module_svd(m) for n, m in lora.modules.items()} for name, lora in loras.items()}


@pytest.fixture(scope="module")
def raw(real_loras_dir):
    """key -> tensor, straight from each file (torch.load / safe_open)."""
    out = {}
    for name in EXPECTED:
        path = real_loras_dir / name
        if name.endswith(".pt"):
            items = torch.load(path, weights_only=True, map_location="cpu")
            out[name] = {f"[{i}]": t.detach() for i, t in enumerate(items)}
        else:
            with safe_open(str(path), "pt") as f:
                out[name] = {k: f.get_tensor(k) for k in f.keys()}
    return out


def _lokr_stem(module):
    return module.source_keys[0].rsplit(".", 1)[0]


def _up_down_keys(module):
    keys = [k for k in module.source_keys if not k.endswith(".alpha")]
    up = next(k for k in keys if k.endswith(("up", "up.weight")) or (k.startswith("[") and int(k[1:-1]) % 2 == 0))
    return up, next(k for k in keys if k != up)


def raw_delta(tensors, module):
    """ΔW (d_out × d_in) formed from the file's own tensors by ComfyUI's formula."""
    if module.kind == "lokr":
        stem = _lokr_stem(module)
        return comfy_lokr_delta({k: tensors[k] for k in module.source_keys}, stem,
                                module.weight_shape).reshape(module.d_out, -1)
    up, down = _up_down_keys(module)
    return comfy_lora_delta(tensors[up], tensors[down])


def raw_apply(tensors, module):
    """x ↦ ΔW·x from the file's own tensors, without forming ΔW."""
    if module.kind == "lokr":
        return lambda x: lokr_apply(tensors, _lokr_stem(module), x)
    up, down = _up_down_keys(module)
    return lambda x: tensors[up].double() @ (tensors[down].double() @ x)


def test_file_facts_match_the_readme(loras, svds):
    for name, (fmt, family, parts, ranks, alphas, dead, extras, dtype) in EXPECTED.items():
        lora = loras[name]
        assert (lora.format, lora.family, lora.parts(), lora.ranks(), lora.alphas()) == \
            (fmt, family, parts, ranks, alphas), name
        assert set(lora.extras) == extras, name
        assert {m.dtype for m in lora.modules.values()} == {dtype}, name
        found_dead = [n for n, f in svds[name].items() if f.dead]
        assert len(found_dead) == dead, name
        if dead:
            assert any(f"{dead} module(s) have an all-zero factor" in w for w in lora.warnings)


def test_dead_modules_are_the_documented_ones(loras, svds):
    for name in ("cloneofsimo__lora_illust_sd2.pt", "cloneofsimo__lora_pop_sd2.pt"):
        dead = {n for n, f in svds[name].items() if f.dead}
        assert len(dead) == 32 and all(n.endswith("_to_out_0") for n in dead)
        assert all(not loras[name].modules[n].up.any() for n in dead)  # lora_up is exactly zero
    for name in ("lycoris__smart_falcon_4_lokr.safetensors", "lycoris__smart_falcon_8_lokr.safetensors"):
        assert {n for n, f in svds[name].items() if f.dead} == LOKR_DEAD


def test_disney_ti_tokens_are_extras_with_a_warning(loras):
    lora = loras["cloneofsimo__lora_disney_sd15.safetensors"]
    assert all("Textual-Inversion" in lora.extras[k] for k in ("<s1>", "<s2>"))
    assert any("<s1>" in w for w in lora.warnings)


def test_every_module_is_in_the_table_with_its_shape(loras):
    for name, lora in loras.items():
        arch = arch_for(lora.family)
        for m in lora.modules.values():
            assert arch.shapes[m.name] == m.weight_shape, (name, m.name)


def test_lokr_convs_are_detected_from_names_not_tensor_rank(loras, raw):
    for name in ("lycoris__smart_falcon_4_lokr.safetensors", "lycoris__smart_falcon_8_lokr.safetensors"):
        lora = loras[name]
        kinds = Counter(m.weight_shape[2:] for m in lora.modules.values() if m.is_conv)
        # 50 3×3 convs (resnets, samplers) + 14 1×1 shortcuts = the README's 64 convs,
        # plus SD1's 32 1×1 proj_in/proj_out
        assert kinds == {(3, 3): 50, (1, 1): 46}
        assert sum(1 for n, m in lora.modules.items() if m.is_conv and "_attentions_" not in n) == 64
        m = lora.modules["lora_unet_down_blocks_1_resnets_0_conv1"]
        assert m.weight_shape == (640, 320, 3, 3) and m.d_in == 320 * 9
        assert all(raw[name][k].dim() == 2 for k in m.source_keys if not k.endswith("alpha"))
    # the Kronecker split differs between the dim-4 and the dim-8 file
    conv = "lora_unet_down_blocks_0_resnets_0_conv1.lokr_w1_a"
    assert raw["lycoris__smart_falcon_4_lokr.safetensors"][conv].shape[0] != \
        raw["lycoris__smart_falcon_8_lokr.safetensors"][conv].shape[0]


def test_cloneofsimo_and_diffusers_share_attention_names(loras):
    diffusers = set(loras["catundchat__pytorch_lora_weights.safetensors"].modules)
    analog = loras["cloneofsimo__analog_svd_rank4_sd15.safetensors"].modules
    assert diffusers < set(analog)
    extra = set(analog) - diffusers
    assert {n.split("transformer_blocks_0_")[-1] for n in extra if n.startswith("lora_unet_")} == {"ff_net_0_proj"}
    assert set(loras["cloneofsimo__lora_disney_sd15.safetensors"].modules) == set(analog)
    kiriko = set(loras["cloneofsimo__lora_kiriko2_sd15.text_encoder.pt"].modules)
    assert kiriko == {n for n in analog if n.startswith("lora_te_")}
    sd2 = set(loras["cloneofsimo__lora_illust_sd2.pt"].modules)
    assert sd2 == diffusers  # same attention modules, SD2 widths
    assert loras["cloneofsimo__lora_illust_sd2.pt"].modules[
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"].d_in == 1024


def test_every_module_is_exactly_an_svd_of_its_raw_delta(loras, svds, raw):
    """U·Σ·Vᵀ equals ΔW from the raw tensors (on probes) with orthonormal U, V, for
    every module of every file."""
    checked = 0
    for name, lora in loras.items():
        for m in lora.modules.values():
            assert_is_svd_of(svds[name][m.name], raw_apply(raw[name], m), m.d_in)
            checked += 1
    assert checked == sum(len(lora.modules) for lora in loras.values()) == 1516


def test_dense_svd_on_every_kind_of_module_in_every_file(loras, svds, raw):
    """torch.linalg.svd of the formed ΔW on the smallest module of each kind
    (block type × kernel) in each file: σ to 1e-4, principal angles < 1e-3 rad."""
    covered = 0
    for name, lora in loras.items():
        groups = arch_for(lora.family).groups
        sample = {}
        for m in lora.modules.values():
            kind = (groups[m.name].split()[-1], m.weight_shape[2:], svds[name][m.name].dead)
            if kind not in sample or m.d_out * m.d_in < sample[kind].d_out * sample[kind].d_in:
                sample[kind] = m
        for m in sample.values():
            assert_svd_matches_dense(svds[name][m.name], raw_delta(raw[name], m))
            covered += 1
    assert covered >= 40
