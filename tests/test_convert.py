"""`convert`: any readable LoRA → kohya safetensors with the same ΔW, named the
way ComfyUI's key maps expect (lora_unet_/lora_te*_ + .lora_down/.lora_up/.alpha)."""

import pytest
import torch
from safetensors import safe_open

from core import cli
from core.formats import load_lora
from core.save import save_kohya
from core.sdarch import arch_for
from core.synthetic import random_lora
from tests.cli_run import run_core
from tests.lora_reference import one_thread  # noqa: F401 (autouse fixture)

SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def convert(src, dst, *extra):
    assert cli.main(["convert", str(src), str(dst), *extra]) == 0


def assert_kohya_layout(path, family):
    """Every key is <table module>.lora_down.weight / .lora_up.weight / .alpha, convs 4-D
    (r×c_in×kh×kw down, d_out×r×1×1 up) — what comfy/lora.py maps and applies."""
    shapes = arch_for(family).shapes
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        for key in keys:
            suffix = next(s for s in SUFFIXES if key.endswith(s))
            name = key[: -len(suffix)]
            assert name in shapes, key
            shape = tuple(f.get_slice(key).get_shape())
            base = shapes[name]
            if suffix == ".lora_down.weight":
                assert shape[1:] == base[1:], key
            elif suffix == ".lora_up.weight":
                assert shape[0] == base[0] and shape[2:] == (1, 1) * (len(base) == 4), key
        assert len(keys) == 3 * len({k.rsplit(".lora_", 1)[0].removesuffix(".alpha") for k in keys})
        return f.metadata()


def assert_same_delta(a, b, exact=True, rtol=1e-6):
    assert set(a.modules) == set(b.modules)
    for name, m in a.modules.items():
        n = b.modules[name]
        assert m.weight_shape == n.weight_shape, name
        if exact:
            assert torch.equal(m.up, n.up) and torch.equal(m.down, n.down), name
            assert m.scale == pytest.approx(n.scale, rel=1e-7), name
    # ΔW itself, densely, on the small modules
    small = [name for name, m in a.modules.items() if m.d_out * m.d_in <= 640 * 640][:40]
    for name in small:
        da, db = a.modules[name].delta(), b.modules[name].delta()
        assert torch.allclose(da, db, rtol=rtol, atol=rtol * float(da.abs().max())), name


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_synthetic_kohya_locon_round_trips(tmp_path, family):
    table = list(arch_for(family).shapes)
    names = table if family == "sd1" else table[::3]   # every kind of SDXL module, a third of them
    lora = random_lora(family, rank=8, seed=21, names=names, alpha=4.0)
    assert any(lora.modules[n].weight_shape[2:] == (3, 3) for n in names)
    src, dst = tmp_path / "src.safetensors", tmp_path / "dst.safetensors"
    save_kohya(lora, str(src))
    convert(src, dst)
    meta = assert_kohya_layout(dst, family)
    assert meta["grassmann_lora.source_format"] == "kohya" and meta["grassmann_lora.family"] == family
    back = load_lora(str(dst))
    assert back.format == "kohya" and back.family == family
    assert_same_delta(lora, back)


def test_real_files_convert_with_the_same_delta(tmp_path, real_loras_dir):
    for name in ("catundchat__pytorch_lora_weights.safetensors", "cloneofsimo__lora_disney_sd15.safetensors",
                 "cloneofsimo__lora_illust_sd2.pt", "lycoris__smart_falcon_4_lokr.safetensors"):
        src = load_lora(str(real_loras_dir / name))
        dst = tmp_path / (name.split(".")[0] + ".kohya.safetensors")
        convert(real_loras_dir / name, dst)
        meta = assert_kohya_layout(dst, src.family)
        assert meta["grassmann_lora.source_format"] == src.format
        back = load_lora(str(dst))
        assert back.format == "kohya" and back.family == src.family
        # factors bit for bit: plain LoRAs in their own dtype, LoKr products in fp32
        assert_same_delta(src, back)
        if src.format == "lycoris-lokr":
            assert {m.dtype for m in back.modules.values()} == {torch.float32}
            assert meta["ss_sd_model_name"] == src.metadata["ss_sd_model_name"]
            assert meta["ss_network_module"] == "networks.lora"   # rewritten, not carried
            assert "sshs_model_hash" not in meta                  # hash of the old tensors


def test_dtype_overwrite_and_same_file(tmp_path, capsys):
    lora = random_lora("sd1", rank=4, seed=3, limit=10)
    src, dst = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_kohya(lora, str(src))
    convert(src, dst, "--dtype", "bf16")
    with safe_open(str(dst), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys() if not k.endswith(".alpha")} == {"BF16"}
    assert cli.main(["convert", str(src), str(dst)]) == 2          # exists, no --overwrite
    assert "overwrite" in capsys.readouterr().err
    convert(src, dst, "--overwrite", "--dtype", "fp16")
    back = load_lora(str(dst))
    assert {m.dtype for m in back.modules.values()} == {torch.float16}
    assert_same_delta(lora, back, exact=False, rtol=2e-3)
    assert cli.main(["convert", str(src), str(src), "--overwrite"]) == 2
    assert "output is the input file" in capsys.readouterr().err


def test_convert_subprocess(tmp_path, real_loras_dir):
    dst = tmp_path / "kiriko.safetensors"
    run = run_core("convert", real_loras_dir / "cloneofsimo__lora_kiriko2_sd15.text_encoder.pt", dst)
    assert run.returncode == 0, run.stderr
    assert "48 modules" in run.stdout and "SD1.x" in run.stdout
    back = load_lora(str(dst))
    assert back.parts() == {"te": 48} and back.format == "kohya"
