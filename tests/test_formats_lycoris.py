"""LyCORIS LoHa and LoKr: the factored form must equal what ComfyUI applies
(reference ΔW: tests/lora_reference.py, ComfyUI's own formulas in float64)."""
import math

import pytest
import torch
from safetensors.torch import save_file

from core.factored import module_svd
from core.formats import load_lora
from core.sdarch import arch_for
from tests.lora_reference import (assert_svd_matches_dense, comfy_loha_delta, comfy_lokr_delta,  # noqa: F401
                                  one_thread)

SD1 = arch_for("sd1")
LINEAR = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"      # 320×768
FF = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2"           # 320×1280
CONV3 = "lora_unet_down_blocks_0_resnets_0_conv1"                                   # 320×320×3×3
CONV1 = "lora_unet_down_blocks_1_resnets_0_conv_shortcut"                           # 640×320×1×1


def _rand(gen, *shape, scale=0.1):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).float()


def loha_tensors(name, r1, r2, gen, tucker=False, alpha=None):
    shape = SD1.shapes[name]
    out, c_in, kernel = shape[0], shape[1], tuple(shape[2:])
    t = {}
    for n, r in (("1", r1), ("2", r2)):
        if tucker:
            t[f"{name}.hada_t{n}"] = _rand(gen, r, r, *kernel)
            t[f"{name}.hada_w{n}_a"] = _rand(gen, r, out)
            t[f"{name}.hada_w{n}_b"] = _rand(gen, r, c_in)
        else:
            t[f"{name}.hada_w{n}_a"] = _rand(gen, out, r)
            t[f"{name}.hada_w{n}_b"] = _rand(gen, r, c_in * math.prod(kernel))
    if alpha is not None:
        t[f"{name}.alpha"] = torch.tensor(float(alpha))
    return t


def lokr_tensors(name, a, b, gen, w1="factored", w2="factored", r=4, alpha=None):
    """ΔW (d_out × d_in·k) = kron(W1 a×b, W2 (d_out/a)×(d_in/b)[×k])."""
    shape = SD1.shapes[name]
    c, d, kernel = shape[0] // a, shape[1] // b, tuple(shape[2:])
    t = {}
    if w1 == "full":
        t[f"{name}.lokr_w1"] = _rand(gen, a, b)
    else:
        t[f"{name}.lokr_w1_a"], t[f"{name}.lokr_w1_b"] = _rand(gen, a, r), _rand(gen, r, b)
    if w2 == "full":
        t[f"{name}.lokr_w2"] = _rand(gen, c, d, *kernel)
    elif w2 == "tucker":
        t[f"{name}.lokr_t2"] = _rand(gen, r, r, *kernel)
        t[f"{name}.lokr_w2_a"], t[f"{name}.lokr_w2_b"] = _rand(gen, r, c), _rand(gen, r, d)
    else:  # kernel folded into the input side, 2-D (the old layout of the real files)
        t[f"{name}.lokr_w2_a"] = _rand(gen, c, r)
        t[f"{name}.lokr_w2_b"] = _rand(gen, r, d * math.prod(kernel))
    if alpha is not None:
        t[f"{name}.alpha"] = torch.tensor(float(alpha))
    return t


def split_kernel_lokr(name, gen, r=4):
    """The real files' layout: conv 320→320 3×3 as w1 20×60 ⊗ w2 16×48 (the
    kernel spread over both input sides), so no factor shows a 3×3 kernel."""
    return {f"{name}.lokr_w1_a": _rand(gen, 20, r), f"{name}.lokr_w1_b": _rand(gen, r, 60),
            f"{name}.lokr_w2_a": _rand(gen, 16, r), f"{name}.lokr_w2_b": _rand(gen, r, 48),
            f"{name}.alpha": torch.tensor(float(r))}


def cases():
    gen = torch.Generator().manual_seed(7)
    return {
        "loha linear": (loha_tensors(LINEAR, 4, 6, gen, alpha=2.0), "loha", LINEAR),
        "loha conv": (loha_tensors(CONV3, 3, 5, gen, alpha=1.5), "loha", CONV3),
        "loha conv tucker": (loha_tensors(CONV3, 4, 4, gen, tucker=True, alpha=4.0), "loha", CONV3),
        "loha 1x1 no alpha": (loha_tensors(CONV1, 2, 3, gen), "loha", CONV1),
        "loha rank>dims": (loha_tensors(LINEAR, 24, 20, gen, alpha=8.0), "loha", LINEAR),
        "lokr old factored": (lokr_tensors(FF, 16, 32, gen, alpha=4), "lokr", FF),
        "lokr old conv 2-D": (lokr_tensors(CONV3, 16, 20, gen, alpha=4), "lokr", CONV3),
        "lokr kernel split": (split_kernel_lokr(CONV3, gen), "lokr", CONV3),
        "lokr full w1": (lokr_tensors(LINEAR, 4, 8, gen, w1="full", r=8, alpha=3), "lokr", LINEAR),
        "lokr conv full w1": (lokr_tensors(CONV3, 4, 4, gen, w1="full", r=6, alpha=2), "lokr", CONV3),
        "lokr tucker": (lokr_tensors(CONV3, 8, 8, gen, w1="full", w2="tucker", r=4, alpha=2), "lokr", CONV3),
        "lokr full both": (lokr_tensors(CONV1, 8, 4, gen, w1="full", w2="full", alpha=9), "lokr", CONV1),
        "lokr full w2": (lokr_tensors(LINEAR, 4, 4, gen, w2="full", r=3, alpha=6), "lokr", LINEAR),
    }


REFERENCE = {"loha": comfy_loha_delta, "lokr": comfy_lokr_delta}



@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lycoris")
    out = {}
    for label, (tensors, kind, name) in cases().items():
        path = folder / (label.replace(" ", "_") + ".safetensors")
        save_file(tensors, str(path), metadata={"ss_base_model_version": "sd_v1"})  # one module alone cannot tell SD1 from SDXL
        out[label] = (load_lora(str(path)), tensors, kind, name)
    return out


@pytest.mark.parametrize("label", list(cases()))
def test_factored_form_equals_comfyui_formula(loaded, label):
    lora, tensors, kind, name = loaded[label]
    assert lora.format == f"lycoris-{kind}" and lora.family == "sd1"
    m = lora.modules[name]
    assert m.kind == kind and m.weight_shape == SD1.shapes[name] and m.is_conv == (len(SD1.shapes[name]) == 4)
    reference = REFERENCE[kind](tensors, name, SD1.shapes[name]).reshape(m.d_out, -1)
    ours = m.delta(torch.float64)
    assert ours.shape == reference.shape
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-6 * reference.abs().max().item())
    # the factored form never exceeds what ΔW can hold
    assert m.factor_rank <= min(m.d_out, m.d_in)


@pytest.mark.parametrize("label", list(cases()))
def test_factored_svd_matches_dense_svd(loaded, label):
    lora, tensors, kind, name = loaded[label]
    m = lora.modules[name]
    dense = REFERENCE[kind](tensors, name, SD1.shapes[name]).reshape(m.d_out, -1)
    assert_svd_matches_dense(module_svd(m), dense)


def test_scale_rules_follow_comfyui(loaded):
    # LoHa: alpha / rank of hada_w1_b; no alpha → 1
    assert loaded["loha linear"][0].modules[LINEAR].scale == pytest.approx(2.0 / 4)
    assert loaded["loha 1x1 no alpha"][0].modules[CONV1].scale == 1.0
    # LoKr: alpha / rank of w2 when factored, else of w1; both full → alpha ignored
    assert loaded["lokr full w1"][0].modules[LINEAR].scale == pytest.approx(3 / 8)
    assert loaded["lokr full w2"][0].modules[LINEAR].scale == pytest.approx(6 / 3)
    assert loaded["lokr full both"][0].modules[CONV1].scale == 1.0
    assert loaded["lokr full both"][0].modules[CONV1].alpha == 9.0


def test_loha_rank_is_the_product_of_ranks(loaded):
    m = loaded["loha linear"][0].modules[LINEAR]
    assert m.factor_rank == 4 * 6 and m.rank == 4
    assert module_svd(m).effective_rank == 24          # generic factors: full rank r1·r2
    big = loaded["loha rank>dims"][0].modules[LINEAR]  # 24·20 = 480 > 320: compressed exactly
    assert big.factor_rank == 320


def test_lokr_rank_is_the_product_of_ranks(loaded):
    m = loaded["lokr old factored"][0].modules[FF]
    assert m.factor_rank == 16 and module_svd(m).effective_rank == 16
