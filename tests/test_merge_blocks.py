"""Block weights (LBW presets and lists, label=value), the "stack without
burning" normalisation on a planted case, and the advisor."""
import pytest
import torch

from core.errors import LoraError
from core.lora import LoraFile, LoraModule
from core.merge import merge
from core.merge.blocks import BLOCKID17, PRESETS, lbw_block, parse_spec
from core.synthetic import perturbed_lora, random_lora

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = ["lora_te_text_model_encoder_layers_0_self_attn_q_proj",                     # BASE
         "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",     # IN01
         "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k",     # IN05
         "lora_unet_mid_block_attentions_0_proj_in",                                 # M00
         "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn1_to_q"]       # OUT05


def rel(a, b):
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


def test_lbw_blocks_and_presets_parse_as_the_lbw_tools_define_them():
    assert [lbw_block(n) for n in NAMES] == ["BASE", "IN01", "IN05", "M00", "OUT05"]
    assert lbw_block("lora_unet_down_blocks_2_downsamplers_0_conv") == "IN09"
    assert lbw_block("lora_unet_up_blocks_0_upsamplers_0_conv") == "OUT02"
    assert lbw_block("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") == "IN04"   # SDXL (LDM)
    assert lbw_block("lora_unet_output_blocks_5_1_proj_in") == "OUT05"
    assert lbw_block("lora_unet_time_embedding_linear_1") is None
    ins = parse_spec("INS", "sd1", {})
    assert ins == dict(zip(BLOCKID17, map(float, PRESETS["INS"].split(","))))
    assert ins["IN04"] == 1 and ins["IN05"] == 0 and ins["BASE"] == 1
    full = parse_spec(",".join(str(i) for i in range(26)), "sd1", {})
    assert full["IN00"] == 1 and full["M00"] == 13 and full["OUT11"] == 25
    xl = parse_spec("1,0,0,0,0,1,0,0,0,0,0,0", "sdxl", {})
    assert xl["M00"] == 1 and xl["IN04"] == 0 and len(xl) == 12
    assert parse_spec("in05=0.5, M00=0", "sd1", {}) == {"IN05": 0.5, "M00": 0.0}
    assert parse_spec("double=0", "flux", {"m": "double"}) == {"double": 0.0}


@pytest.mark.parametrize("spec,msg", [("1,1,1", "LBW takes 17 or 26"), ("SOMETIMES", "unknown block-weight preset"),
                                      ("IN99=1", "unknown block"), ("1,x,1", "not a number"),
                                      ("IN01=nan", "not a finite number"), ("M00=-inf", "not a finite number"),
                                      (",".join(["inf"] + ["1"] * 16), "not a finite number"),
                                      ("IN01=2,in01=0", "IN01 is given twice")])
def test_bad_block_weights_are_one_line_errors(spec, msg):
    with pytest.raises(LoraError, match=msg) as err:
        parse_spec(spec, "sd1", {})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("method", ["svd", "ties", "tsv", "karcher"])
def test_weight_zero_on_a_block_equals_merging_without_those_modules(method):
    a = random_lora("sd1", rank=4, seed=1, names=NAMES, path="a.safetensors")
    b = perturbed_lora(a, 0.3, 2, path="b.safetensors")
    c = random_lora("sd1", rank=4, seed=3, names=NAMES, path="c.safetensors")
    zero_in05 = "IN05=0"
    res = merge([a, b, c], [0.5, 0.3, 0.2], method=method, rank=4, block_weights=[None, zero_in05, "M00=0"],
                dtype=F64)
    drop = lambda lora, name: LoraFile(lora.path, lora.format, lora.family,  # noqa: E731
                                        {n: m for n, m in lora.modules.items() if n != name})
    ref = merge([a, drop(b, NAMES[2]), drop(c, NAMES[3])], [0.5, 0.3, 0.2], method=method, rank=4, dtype=F64)
    for name in NAMES:
        assert rel(res.lora.modules[name].delta(), ref.lora.modules[name].delta()) < 1e-10, name
    # "take these blocks from A, those from B": A's input blocks, B's output blocks
    ab = merge([a, c], [1, 1], method="linear", block_weights=["IN01=1,IN05=1,M00=0,OUT05=0,BASE=0",
                                                                 "IN01=0,IN05=0,M00=1,OUT05=1,BASE=1"], dtype=F64)
    for name, src in zip(NAMES, [c, a, a, c, c]):
        assert rel(ab.lora.modules[name].delta(), src.modules[name].delta().double()) < 1e-12
    assert res.recipe["block_weights"] == [None, zero_in05, "M00=0"]
    with pytest.raises(LoraError, match="2 block-weight spec"):
        merge([a, b, c], method=method, block_weights=["ALL", "ALL"])


def test_block_weights_out_of_range_or_negative_for_a_mean_name_the_file_and_module():
    """The block factor times the source's weight is checked like a weight, before any work."""
    a = random_lora("sd1", rank=2, seed=1, names=NAMES, path="a.safetensors")
    c = random_lora("sd1", rank=2, seed=3, names=NAMES, path="c.safetensors")
    with pytest.raises(LoraError, match="out of range") as err:
        merge([a, c], [2, 1], method="linear", block_weights=["IN01=1e4", None])
    assert err.value.path == "a.safetensors" and err.value.key == NAMES[1]
    for method in ("karcher", "chordal", "flag-median"):
        with pytest.raises(LoraError, match="negative") as err:
            merge([a, c], method=method, block_weights=[None, "M00=-0.5"])
        assert err.value.path == "c.safetensors" and err.value.key == NAMES[3]
    merge([a, c], method="svd", rank=2, block_weights=[None, "M00=-0.5"])   # a difference: allowed


def test_a_named_block_that_matches_no_module_is_an_error_not_a_silent_no_op():
    """LBW block IDs on a Flux LoRA (its modules are in none of LBW's UNet blocks), or a
    block these LoRAs have no module in: before, the merge ran as if no block weight
    was given. Lists and presets cover every block and may miss some."""
    from tests.dit_files import random_dit_lora, sample_names
    names = sample_names("flux", "dev", per_group=1, groups=1)[:4]
    flux = [random_dit_lora("flux", "dev", names, rank=2, seed=s) for s in (1, 2)]
    with pytest.raises(LoraError, match="'IN04' in block weights 'IN04=0' matches no module"):
        merge(flux, method="linear", block_weights=["IN04=0", None])
    a = random_lora("sd1", rank=2, seed=1, names=NAMES, path="a.safetensors")
    c = random_lora("sd1", rank=2, seed=3, names=NAMES, path="c.safetensors")
    with pytest.raises(LoraError, match="'OUT11' in block weights 'M00=0.5,OUT11=0' matches no module"):
        merge([a, c], method="linear", block_weights=[None, "M00=0.5,OUT11=0"])
    merge([a, c], method="linear", block_weights=["OUTALL", "M00=0.5,OUT05=0"])    # OUTALL names OUT11 too


def planted(seed=0, d=320, r=4):
    """Two LoRAs sharing half their directions: ΔW_1 = shared + private_1, ΔW_2 = shared + private_2."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(d, 3 * r, generator=g, dtype=F64))[0]
    v = torch.linalg.qr(torch.randn(d, 3 * r, generator=g, dtype=F64))[0]
    s = torch.rand(3 * r, generator=g, dtype=F64) + 0.5
    part = [(u[:, i * r:(i + 1) * r] * s[i * r:(i + 1) * r]) @ v[:, i * r:(i + 1) * r].T for i in range(3)]
    name = NAMES[1]
    loras = []
    for k in (1, 2):
        up = torch.cat([u[:, :r] * s[:r], u[:, k * r:(k + 1) * r] * s[k * r:(k + 1) * r]], 1)
        down = torch.cat([v[:, :r].T, v[:, k * r:(k + 1) * r].T], 0)
        loras.append(LoraFile(f"p{k}.safetensors", "kohya", "sd1", {name: LoraModule(name, up, down)}))
    return loras, part, name


def test_normalise_brings_shared_directions_to_one_source_and_keeps_private_ones():
    loras, (shared, p1, p2), name = planted()
    plain = merge(loras, [1, 1], method="linear", dtype=F64).lora.modules[name].delta()
    assert rel(plain, 2 * shared + p1 + p2) < 1e-12                   # the burn: shared twice
    for method in ("linear", "concat", "svd"):
        res = merge(loras, [1, 1], method=method, normalise=True, rank=12 if method == "svd" else None, dtype=F64)
        d = res.lora.modules[name].delta()
        assert rel(d, shared + p1 + p2) < 1e-10, method
    cut = merge(loras, [1, 1], method="svd", normalise=True, rank=6, dtype=F64).lora.modules[name].delta()
    u, s, vh = torch.linalg.svd(shared + p1 + p2)
    assert rel(cut, (u[:, :6] * s[:6]) @ vh[:6]) < 1e-10
    with pytest.raises(LoraError, match="normalise is offered"):
        merge(loras, [1, 1], method="tsv", normalise=True)


def test_advisor_figures_match_principal_angles_and_phi_done_densely():
    """The advisor's widest angle and φ (cross blocks of the column bases, least
    eigenvalue of their smaller Gram) against scipy's principal angles of the
    dense ΔW's column spaces: identical spaces ≈ 0°, orthogonal ones 90°, and
    unequal ranks (4, 6, 5) pair by pair."""
    import math
    from tests.subspace_reference import angles
    from core.measures import chance_phi
    g = torch.Generator().manual_seed(5)
    d, name = 96, NAMES[1]
    q = torch.linalg.qr(torch.randn(d, 15, generator=g, dtype=F64))[0]

    def src(k, up):
        return LoraFile(f"s{k}.safetensors", "kohya", "sd1", {name: LoraModule(
            name, up, torch.randn(up.shape[1], d, generator=g, dtype=F64))})
    mix = torch.randn(4, 4, generator=g, dtype=F64)
    same = [src(0, q[:, :4]), src(1, q[:, :4] @ mix)]              # one column space, other factors
    orthogonal = [src(2, q[:, :4]), src(3, q[:, 4:8])]
    ranks = [src(4, torch.randn(d, 4, generator=g, dtype=F64)), src(5, q[:, :6] + 0.3 * torch.randn(d, 6, generator=g, dtype=F64)),
             src(6, q[:, 2:7] + 0.2 * torch.randn(d, 5, generator=g, dtype=F64))]
    adv = merge(same, [1, 1], method="svd", dtype=F64).report.modules[0].advice
    assert adv["max_angle_deg"] < 1e-4 and abs(adv["phi"] - 1) < 1e-12 and adv["advice"] == "karcher"
    adv = merge(orthogonal, [1, 1], method="svd", dtype=F64).report.modules[0].advice
    assert abs(adv["max_angle_deg"] - 90) < 1e-6 and adv["phi"] < 1e-24 and adv["advice"] == "linear"
    adv = merge(ranks, [1, 0.5, 0.7], method="svd", dtype=F64).report.modules[0].advice
    bases = [torch.linalg.svd(x.modules[name].delta(), full_matrices=False)[0][:, :x.modules[name].rank]
             for x in ranks]
    pairs = [(a, b) for a in range(3) for b in range(a + 1, 3)]
    widest = max(float(angles(bases[a], bases[b])[-1]) for a, b in pairs)
    assert abs(adv["max_angle_deg"] - math.degrees(widest)) < 1e-8
    phis = {(a, b): float(((bases[a].T @ bases[b]) ** 2).sum()) / min(bases[a].shape[1], bases[b].shape[1])
            for a, b in pairs}
    best = max(pairs, key=lambda p: phis[p] / chance_phi(bases[p[0]].shape[1], bases[p[1]].shape[1], d))
    assert abs(adv["phi"] - phis[best]) < 1e-12


def test_advisor_names_the_fitting_method():
    a = random_lora("sd1", rank=4, seed=1, names=NAMES[1:3], path="a.safetensors")
    close = perturbed_lora(a, 0.05, 2, path="b.safetensors")
    other = random_lora("sd1", rank=4, seed=3, names=NAMES[1:3], path="c.safetensors")
    loras, _, name = planted()
    cases = [([a, close], "karcher"), ([a, other], "linear"), (loras, "ties/tsv/iso")]
    for srcs, want in cases:
        res = merge(srcs, [1, 1], method="svd")
        assert all(m.advice["advice"] == want for m in res.report.modules), want
        assert want in res.report.table() and "advice" in res.report.table()
    unrelated = merge([a, other], [1, 1], method="svd").report.modules[0].advice
    assert unrelated["phi"] < 4 * unrelated["chance"] and unrelated["max_angle_deg"] > 80
