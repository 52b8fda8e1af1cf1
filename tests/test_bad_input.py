"""Bad input: one-line LoraError naming the file and the key; the CLI exits 2
without a traceback. All-zero modules are not errors."""
import fractions
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from core import cli
from core.errors import LoraError
from core.factored import module_svd
from core.formats import load_lora
from core.save import save_kohya
from core.synthetic import random_lora
from tests.cli_run import assert_line_per_file, assert_names, run_core

TO_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
FF2 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2"


def _kohya(tmp, name, **edits):
    """A small valid SD1 kohya file, with tensors replaced or added by ``edits``."""
    base = tmp / f"{name}.base.safetensors"
    save_kohya(random_lora("sd1", rank=4, seed=11, limit=14), str(base))
    t = load_file(str(base))
    base.unlink()
    for key, value in edits.items():
        if value is None:
            t.pop(key)
        else:
            t[key] = value
    path = tmp / f"{name}.safetensors"
    save_file(t, str(path))
    return path


def make_cases(tmp: Path) -> dict[str, tuple[Path, str | None, str]]:
    """label -> (file, key the error must name or None, words the message must hold)."""
    cases = {}
    good = _kohya(tmp, "good")
    data = good.read_bytes()
    (tmp / "truncated.safetensors").write_bytes(data[: len(data) - 3000])
    cases["truncated"] = (tmp / "truncated.safetensors", "*", "truncated")
    (tmp / "random.safetensors").write_bytes(random.Random(0).randbytes(4096))
    cases["random bytes"] = (tmp / "random.safetensors", None, "not a LoRA file")
    (tmp / "empty.safetensors").write_bytes(b"")
    cases["empty"] = (tmp / "empty.safetensors", None, "empty")
    (tmp / "notes.safetensors").write_text("just some text, not tensors\n" * 20)
    cases["text file"] = (tmp / "notes.safetensors", None, "not a LoRA file")
    ckpt = {f"model.diffusion_model.input_blocks.{i}.0.weight": torch.zeros(8, 4) for i in range(4)}
    ckpt.update({f"model.diffusion_model.input_blocks.{i}.0.bias": torch.zeros(8) for i in range(4)})
    save_file(ckpt, str(tmp / "checkpoint.safetensors"))
    cases["full checkpoint"] = (tmp / "checkpoint.safetensors", "model.diffusion_model.input_blocks.0.0.weight",
                                "full model checkpoint, not a LoRA")
    nan = torch.randn(4, 320)
    nan[2, 7] = float("nan")
    cases["nan"] = (_kohya(tmp, "nan", **{f"{TO_Q}.lora_down.weight": nan}), f"{TO_Q}.lora_down.weight", "NaN")
    cases["inf alpha"] = (_kohya(tmp, "infalpha", **{f"{TO_Q}.alpha": torch.tensor(float("inf"))}),
                          f"{TO_Q}.alpha", "NaN/Inf")
    cases["up/down shapes"] = (_kohya(tmp, "shapes", **{f"{TO_Q}.lora_down.weight": torch.randn(4, 768)}),
                               f"{TO_Q}.lora_down.weight", "contradicts")
    cases["rank mismatch"] = (_kohya(tmp, "rank", **{f"{TO_Q}.lora_down.weight": torch.randn(8, 320)}),
                              f"{TO_Q}.lora_up.weight", "rank mismatch")
    cases["family table"] = (_kohya(tmp, "table", **{f"{FF2}.lora_up.weight": torch.randn(640, 4)}),
                             f"{FF2}.lora_down.weight", "contradicts the SD1.x shape")
    cases["missing down"] = (_kohya(tmp, "missing", **{f"{TO_Q}.lora_down.weight": None}),
                             f"{TO_Q}.lora_up.weight", "no down")
    loha = {f"{TO_Q}.hada_w1_a": torch.randn(320, 2), f"{TO_Q}.hada_w1_b": torch.randn(2, 320),
            f"{TO_Q}.hada_w2_a": torch.randn(320, 2)}
    save_file(loha, str(tmp / "loha.safetensors"))
    cases["loha incomplete"] = (tmp / "loha.safetensors", f"{TO_Q}.hada_w1_a", "no hada_w2_b")
    save_file({f"{TO_Q}.oft_blocks": torch.randn(4, 80, 80)}, str(tmp / "oft.safetensors"))
    cases["only OFT"] = (tmp / "oft.safetensors", f"{TO_Q}.oft_blocks", "unsupported adapter")
    torch.save([torch.zeros(320, 4), fractions.Fraction(1, 3)], tmp / "code.pt")
    cases["needs unpickling code"] = (tmp / "code.pt", None, "refusing to unpickle")
    torch.save([torch.zeros(320, 4), torch.zeros(4, 320)], tmp / "list.pt")
    raw = (tmp / "list.pt").read_bytes()
    (tmp / "cut.pt").write_bytes(raw[: len(raw) // 2])
    cases["truncated .pt"] = (tmp / "cut.pt", None, "cannot read PyTorch file")
    torch.save([torch.zeros(320, 4), torch.zeros(4, 320), torch.zeros(320, 4)], tmp / "odd.pt")
    cases["odd cloneofsimo list"] = (tmp / "odd.pt", "[2]", "odd number of tensors")
    cases["missing file"] = (tmp / "nope.safetensors", None, "no such file")
    return cases


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return make_cases(tmp_path_factory.mktemp("bad"))


def test_each_bad_input_is_a_one_line_error_naming_file_and_key(cases):
    for label, (path, key, words) in cases.items():
        with pytest.raises(LoraError) as err:
            load_lora(str(path))
        assert_names(str(err.value), path, key, words)
        assert err.value.path == str(path), label
        if key and key != "*":
            assert err.value.key == key, label


def test_cli_exits_2_with_one_line_and_no_traceback(cases, capsys):
    for label, (path, key, words) in cases.items():
        assert cli.main(["inspect", str(path)]) == 2, label
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (label, err)
        assert_names(lines[0], path, key, words)


def test_cli_in_a_subprocess(cases, tmp_path):
    """The real entry point: every bad file in one `inspect` run, then a `convert`."""
    assert_line_per_file(run_core("inspect", "--summary", *[p for p, _, _ in cases.values()]), cases)
    nan_path, nan_key, _ = cases["nan"]
    run = run_core("convert", nan_path, tmp_path / "o.safetensors")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.count("\n") == 1 and nan_key in run.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_all_zero_module_is_kept_and_flagged_dead(tmp_path, capsys):
    path = _kohya(tmp_path, "zero", **{f"{TO_Q}.lora_up.weight": torch.zeros(320, 4)})
    lora = load_lora(str(path))
    assert len(lora.modules) == 14 and module_svd(lora.modules[TO_Q]).dead
    assert any("1 module(s) have an all-zero factor" in w for w in lora.warnings)
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"dead      1: {TO_Q}" in out


def test_unsupported_adapter_beside_usable_modules_is_an_extra(tmp_path):
    path = _kohya(tmp_path, "mixed", **{"lora_unet_mid_block_attentions_0_proj_in.oft_blocks": torch.randn(4, 80, 80)})
    lora = load_lora(str(path))
    assert len(lora.modules) == 14
    assert "OFT" in lora.extras["lora_unet_mid_block_attentions_0_proj_in.oft_blocks"]
    assert any("oft_blocks" in w for w in lora.warnings)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_check_finite_finds_every_kind_of_non_finite_value(bad, dtype):
    from core.lora import check_finite
    t = torch.randn(64, 8).to(dtype)
    check_finite("f.safetensors", "k", t)            # finite: no error
    t[17, 3] = bad
    with pytest.raises(LoraError, match=r"1 non-finite value") as info:
        check_finite("f.safetensors", "k", t)
    assert "f.safetensors" in str(info.value) and "k" in str(info.value)


def test_is_all_zero():
    from core.lora import is_all_zero
    z = torch.zeros(5, 3)
    assert is_all_zero(z) and is_all_zero(torch.zeros(0, 3))
    z[4, 2] = -1e-30
    assert not is_all_zero(z)
