"""Split layouts: diffusers' to_q/to_k/to_v (and proj_mlp) of a fused LDM
weight read as ONE fused module, exactly (block-diagonal up, stacked down),
checked against the rows each part's own ΔW must land in."""
import torch
from safetensors.torch import save_file

from core.formats import load_lora
from core.formats.fused import fuse
from core.sdarch import Arch, arch_for
from tests.lora_reference import one_thread  # noqa: F401 (autouse fixture)

H = 3072
COLS = slice(0, 64)  # compare ΔW on a column slice: the fused weights are up to 21504×3072


def test_add_split_places_parts():
    arch = Arch("toy")
    arch.add_split("lora_unet_blk_qkv", (6, 4), "blk", [("blk.q", 0, 2), ("blk.k", 2, 4), ("blk.v", 4, 6)],
                   "blk.qkv")
    arch.add_split("lora_unet_ada", (4, 4), "out", [("ada2", 0, 2, 2), ("ada2", 2, 4, 0)])
    assert arch.canonical("blk_qkv") == "lora_unet_blk_qkv"
    assert arch.split_of("blk.k") == ("lora_unet_blk_qkv", ((2, 4, 0),))
    assert arch.split_of("blk_v") == ("lora_unet_blk_qkv", ((4, 6, 0),))
    assert arch.split_of("ada2") == ("lora_unet_ada", ((0, 2, 2), (2, 4, 0)))
    assert arch.split_of("blk.qkv") is None


def test_fuse_against_dense():
    g = torch.Generator().manual_seed(0)
    parts = []
    dense = torch.zeros(10, 5, dtype=torch.float64)
    for (start, end), r, s in (((0, 3), 2, 0.5), ((6, 10), 3, 2.0)):
        u, d = torch.randn(end - start, r, generator=g).double(), torch.randn(r, 5, generator=g).double()
        parts.append((u, d, s, ((start, end, 0),)))
        dense[start:end] = s * u @ d
    up, down, scale = fuse(10, parts)
    assert up.shape == (10, 5) and down.shape == (5, 5)
    torch.testing.assert_close(scale * up @ down, dense, rtol=0, atol=1e-12)
    # a part placed twice with its halves swapped
    u, d = torch.randn(4, 2, generator=g).double(), torch.randn(2, 3, generator=g).double()
    up, down, scale = fuse(4, [(u, d, 1.0, ((0, 2, 2), (2, 4, 0)))])
    torch.testing.assert_close(up @ down, torch.cat([u[2:] @ d, u[:2] @ d]), rtol=0, atol=1e-12)


def _peft(tensors, key, d_out, d_in, r, g, alpha=None):
    up = torch.randn(d_out, r, generator=g) * 1e-2
    down = torch.randn(r, d_in, generator=g) / d_in ** 0.5
    tensors[f"{key}.lora_B.weight"] = up
    tensors[f"{key}.lora_A.weight"] = down
    if alpha is not None:
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    return (alpha / r if alpha is not None else 1.0) * up.double() @ down.double()


def test_flux_diffusers_split_parts_read_fused(tmp_path):
    g = torch.Generator().manual_seed(1)
    t = {}
    q = _peft(t, "transformer.transformer_blocks.0.attn.to_q", H, H, 4, g, alpha=2.0)
    v = _peft(t, "transformer.transformer_blocks.0.attn.to_v", H, H, 2, g, alpha=8.0)  # no to_k
    s_q = _peft(t, "transformer.single_transformer_blocks.3.attn.to_q", H, H, 2, g)
    mlp = _peft(t, "transformer.single_transformer_blocks.3.proj_mlp", 4 * H, H, 3, g)
    out = _peft(t, "transformer.norm_out.linear", 2 * H, H, 2, g)
    proj = _peft(t, "transformer.transformer_blocks.0.attn.to_out.0", H, H, 2, g)
    path = tmp_path / "flux_diffusers.safetensors"
    save_file(t, str(path))
    lora = load_lora(str(path))
    assert lora.family == "flux"
    assert set(lora.modules) == {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_3_linear1",
                                 "lora_unet_final_layer_adaLN_modulation_1", "lora_unet_double_blocks_0_img_attn_proj"}

    def dense(name):
        m = lora.modules[name]
        assert (m.d_out, m.d_in) == (arch_for("flux").shapes[name][0], H)
        return m.scale * m.up.double() @ m.down.double()[:, COLS]

    qkv = dense("lora_unet_double_blocks_0_img_attn_qkv")
    assert lora.modules["lora_unet_double_blocks_0_img_attn_qkv"].factor_rank == 6
    torch.testing.assert_close(qkv[:H], q[:, COLS], rtol=0, atol=1e-9)
    assert qkv[H:2 * H].abs().max() == 0  # to_k absent: zero rows
    torch.testing.assert_close(qkv[2 * H:], v[:, COLS], rtol=0, atol=1e-9)
    lin1 = dense("lora_unet_single_blocks_3_linear1")
    torch.testing.assert_close(lin1[:H], s_q[:, COLS], rtol=0, atol=1e-9)
    assert lin1[H:3 * H].abs().max() == 0
    torch.testing.assert_close(lin1[3 * H:], mlp[:, COLS], rtol=0, atol=1e-9)
    ada = dense("lora_unet_final_layer_adaLN_modulation_1")  # diffusers (scale, shift) → LDM (shift, scale)
    torch.testing.assert_close(ada, torch.cat([out[H:], out[:H]])[:, COLS], rtol=0, atol=1e-9)
    torch.testing.assert_close(dense("lora_unet_double_blocks_0_img_attn_proj"), proj[:, COLS], rtol=0, atol=1e-9)


def test_merge_led_by_a_split_file_writes_the_fused_modules_under_their_own_names(tmp_path):
    """A merge's default "first" naming must not write a fused module under one
    of its parts' keys (OneTrainer's lora_transformer_…_attn_to_k holding the
    9216-row qkv: ComfyUI maps that key to a 3072-row slice and refuses it; the
    swapped norm_out would be swapped twice). DiT merges write the LDM names the
    README promises, whatever the first source's spelling."""
    from safetensors.torch import load_file

    from core.merge import merge
    from tests import dit_files

    names = ["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_img_attn_proj",
             "lora_unet_single_blocks_0_linear1", "lora_unet_final_layer_adaLN_modulation_1"]
    a = dit_files.random_dit_lora("flux", "dev", names, rank=2, seed=3)
    b = dit_files.random_dit_lora("flux", "dev", names, rank=2, seed=4)
    first = load_lora(dit_files.write(a, "flux", "dev", "onetrainer", tmp_path / "ot.safetensors"))
    other = load_lora(dit_files.write(b, "flux", "dev", "kohya", tmp_path / "k.safetensors"))
    assert first.format == "kohya" and set(first.modules) == set(names)
    res = merge([first, other], [1.0, 1.0], method="concat")
    path = res.save(str(tmp_path / "merged.safetensors"))
    assert {k.split(".", 1)[0] for k in load_file(path)} == set(names)
    back = load_lora(path)
    for name in names:
        want = res.lora.modules[name]
        got = back.modules[name]
        torch.testing.assert_close(got.scale * got.up.double() @ got.down.double()[:, COLS],
                                   want.scale * want.up.double() @ want.down.double()[:, COLS], rtol=1e-6, atol=1e-12)
