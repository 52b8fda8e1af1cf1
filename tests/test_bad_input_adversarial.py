"""The adversarial run's bad inputs (issue 14): each is a one-line LoraError
naming the file (and key), fast and with memory near the data read; the CLI
exits 2 with one line, no traceback; nothing is written."""
import json
import os
import resource
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core.errors import LoraError
from core.formats import adapters, load_lora
from tests.cli_run import assert_line_per_file, assert_names, assert_one_line_error, call_core, core_env

ROOT = Path(__file__).resolve().parents[1]
TO_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def _raw_safetensors(path: Path, header: str, data: bytes = b"") -> Path:
    raw = header.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _entry(dtype="F32", shape="[4, 320]", offsets="[0, 5120]"):
    return f'"{TO_Q}.lora_down.weight": {{"dtype": "{dtype}", "shape": {shape}, "data_offsets": {offsets}}}'


def _lokr(path: Path, n: int, full: bool) -> Path:
    """A LoKr module whose Kronecker factors describe an n²×n² ΔW."""
    key = "lora_unet_big_layer"
    if full:
        t = {f"{key}.lokr_w1": torch.randn(n, n), f"{key}.lokr_w2": torch.randn(n, n)}
    else:
        t = {f"{key}.lokr_w1_a": torch.randn(n, 1), f"{key}.lokr_w1_b": torch.randn(1, n),
             f"{key}.lokr_w2_a": torch.randn(n, 1), f"{key}.lokr_w2_b": torch.randn(1, n)}
    save_file(t, str(path))
    return path


def make_cases(tmp: Path) -> dict[str, tuple[Path, str | None, str]]:
    """label -> (file, key the error must name or None, words the message must hold)."""
    cases = {}
    deep = "[" * 100_000 + "]" * 100_000
    cases["header nested 10⁵ deep"] = (_raw_safetensors(tmp / "deep.safetensors", '{"x": ' + deep + "}"),
                                        None, "nested too deeply")
    cases["Infinity offset"] = (_raw_safetensors(tmp / "inf_off.safetensors",
                                                 "{" + _entry(offsets="[0, Infinity]") + "}", bytes(5120)),
                                None, "Infinity is not allowed")
    cases["Infinity shape"] = (_raw_safetensors(tmp / "inf_shape.safetensors",
                                                "{" + _entry(shape="[4, Infinity]") + "}", bytes(5120)),
                               None, "Infinity is not allowed")
    cases["fractional shape"] = (_raw_safetensors(tmp / "frac.safetensors",
                                                  "{" + _entry(shape="[4, 320.5]") + "}", bytes(5120)),
                                 f"{TO_Q}.lora_down.weight", "whole numbers")
    cases["shape/offsets disagree"] = (_raw_safetensors(tmp / "size.safetensors",
                                                        "{" + _entry(shape="[4000000, 320000]") + "}",
                                                        bytes(5120)),
                                       f"{TO_Q}.lora_down.weight", "data_offsets give 5120")
    save_file({f"{TO_Q}.lora_down.weight": torch.zeros(0, 320), f"{TO_Q}.lora_up.weight": torch.zeros(320, 0)},
              str(tmp / "rank0.safetensors"))
    cases["rank-0 factors"] = (tmp / "rank0.safetensors", "*", "zero-sized dimension")
    me = {"w": torch.zeros(2, 2)}
    me["self"] = me
    torch.save(me, tmp / "selfref.pt")
    cases["self-referencing pickle"] = (tmp / "selfref.pt", None, "refers to one container twice")
    nest = {"w": torch.zeros(2)}
    for _ in range(100):
        nest = {"n": nest}
    torch.save(nest, tmp / "nested.pt")
    cases["pickle nested 100 deep"] = (tmp / "nested.pt", "*", "nested more than")
    dag = {"w": torch.zeros(2)}
    for _ in range(40):               # 2⁴⁰ paths through 40 shared dicts
        dag = {"a": dag, "b": dag}
    torch.save(dag, tmp / "dag.pt")
    small_dag = {"w": torch.zeros(2)}
    for _ in range(8):
        small_dag = {"a": small_dag, "b": small_dag}
    torch.save(small_dag, tmp / "small_dag.pt")
    cases["shallow pickle DAG"] = (tmp / "small_dag.pt", "*", "refers to one container twice")
    cases["pickle DAG with 2⁴⁰ paths"] = (tmp / "dag.pt", "*", "; not a LoRA")
    cases["LoKr 10⁴×10⁴ full factors"] = (_lokr(tmp / "lokr_1e4.safetensors", 100, True),
                                           "lora_unet_big_layer.lokr_w1", "too large to read")
    cases["LoKr declaring a 32 GB ΔW"] = (_lokr(tmp / "lokr_32gb.safetensors", 300, True),
                                          "lora_unet_big_layer.lokr_w1", "too large to read")
    return cases


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return make_cases(tmp_path_factory.mktemp("adversarial"))


def test_each_is_one_line_naming_the_file(cases):
    for label, (path, key, words) in cases.items():
        with pytest.raises(LoraError) as err:
            load_lora(str(path))
        assert_names(str(err.value), path, key, words)


def test_cli_one_run_over_all_of_them_exits_2_fast(cases, tmp_path):
    assert_line_per_file(call_core("inspect", "--summary", *[p for p, _, _ in cases.values()]), cases)


def test_lokr_is_read_from_its_factors_without_forming_the_dense_delta(tmp_path):
    """The same 10⁴×10⁴ LoKr with rank-1 Kronecker factors: R = 1, read and
    inspected in its factored form (a dense ΔW would be 400 MB)."""
    path = _lokr(tmp_path / "lokr_lowrank.safetensors", 100, False)
    lora = load_lora(str(path))
    m = lora.modules["lora_unet_big_layer"]
    assert (m.d_out, m.d_in, m.factor_rank) == (10_000, 10_000, 1)
    # entry (i, j) of kron(W1, W2) against the factors, no dense product
    from safetensors.torch import load_file
    t = load_file(str(path))
    w1 = t["lora_unet_big_layer.lokr_w1_a"] @ t["lora_unet_big_layer.lokr_w1_b"]
    w2 = t["lora_unet_big_layer.lokr_w2_a"] @ t["lora_unet_big_layer.lokr_w2_b"]
    for i, j in ((0, 0), (1234, 9876), (9999, 5)):
        want = float(w1[i // 100, j // 100] * w2[i % 100, j % 100]) * m.scale
        got = float(m.scale * (m.up[i] @ m.down[:, j]))
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    run = call_core("inspect", path)
    assert run.returncode == 0, run.stderr


def test_plan_inner_size_is_what_build_factors_allocates(monkeypatch):
    """The budget is checked on ModulePlan.inner before reading: it must be
    the inner size build_factors really makes (before compression)."""
    from core.formats.reader import open_lora
    seen = {}
    real = adapters.compress_factors
    monkeypatch.setattr(adapters, "compress_factors", lambda up, down: seen.setdefault("inner", up.shape[1])
                        and real(up, down))
    fixtures = ROOT.parent / "shared" / "fixtures" / "real_loras"
    path = fixtures / "lycoris__smart_falcon_4_lokr.safetensors"
    if not path.exists():
        pytest.skip("real LoKr fixture absent")
    with open_lora(str(path)) as reader:
        for name in reader.names[:40]:
            seen.clear()
            reader.read(name)
            assert reader.plan(name).inner == seen["inner"], name


def test_garbage_header_in_a_2gb_sparse_file_fails_fast_with_little_memory(tmp_path):
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", 1_900_000_000) + b"{" + b"\x00" * 7)
        fh.truncate(2 * 1024 ** 3)
    # a fresh process: its peak RSS after the imports, then after the failed load
    code = ("import resource, sys\nfrom core.formats import load_lora\nfrom core.errors import LoraError\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
            "try:\n    load_lora(sys.argv[1])\nexcept LoraError as e:\n    print(e)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=ROOT,
                         timeout=120, env=core_env())
    base, message, rss = run.stdout.strip().splitlines()
    assert str(path) in message and "at most" in message
    assert int(rss) - int(base) < 64 * 1024      # KiB: < 64 MB above the imports' peak


def test_write_failures_from_the_cli_are_one_line(tmp_path):
    src = tmp_path / "a.safetensors"
    from core.save import save_kohya
    from core.synthetic import random_lora
    save_kohya(random_lora("sd1", rank=2, seed=0, limit=3), str(src))
    (tmp_path / "dir.safetensors").mkdir()
    for out, words in ((tmp_path / "dir.safetensors", "is a folder"),
                       (tmp_path / ("n" * 300 + ".safetensors"), "too long")):
        assert_one_line_error(call_core("convert", src, out), words)
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "dir.safetensors"]


def test_load_node_names_the_file_for_every_case(cases):
    """The ComfyUI Load node's reader (nodes.lora_io.load_cached) raises the
    same one-line LoraError, never RecursionError/OverflowError/…"""
    import importlib.util
    if "grassmann_lora" not in sys.modules:      # the repository as ComfyUI imports it
        spec = importlib.util.spec_from_file_location("grassmann_lora", ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["grassmann_lora"] = module
        spec.loader.exec_module(module)
    lora_io = importlib.import_module("grassmann_lora.nodes.lora_io")
    for label, (path, key, words) in cases.items():
        with pytest.raises(Exception) as err:
            lora_io.load_cached(str(path))
        assert type(err.value).__name__ == "LoraError", (label, type(err.value))
        assert_names(str(err.value), path, key, words)


# ------------------------------------------------------------------ merge parameters, checked up front

@pytest.fixture(scope="module")
def rank1_pair(tmp_path_factory):
    from core.save import save_kohya
    from core.synthetic import random_lora
    folder = tmp_path_factory.mktemp("merge_params")
    return [save_kohya(random_lora("sd1", rank=1, seed=s, limit=3), str(folder / f"r{s}.safetensors"))
            for s in (1, 2)]


@pytest.mark.parametrize("extra, words", [
    (["--weights", "1e308", "1e308"], "out of range"),
    (["--weights", "1e30", "1e30", "--dtype", "fp16"], "out of range"),
    (["--weights", "nan", "1"], "finite"),
    (["--max-iter", "-1"], "max_iter"),
    (["--rank", "4"], "rank 1 here"),
    (["--method", "ties", "--ties-density", "nan"], "ties density"),
    (["--method", "dare", "--dare-drop", "nan"], "dare drop probability"),
    (["--method", "tsv", "--keep", "nan"], "tsv keep"),
    (["--device", "foo"], "unknown torch device 'foo'"),
    (["--device", "cuda:99"], "cuda:99"),
    (["--device", "mps"], "cpu or cuda"),
])
def test_merge_parameters_refused_before_writing(rank1_pair, tmp_path, extra, words):
    out = tmp_path / "m.safetensors"
    line = assert_one_line_error(call_core("merge", *rank1_pair, "-o", out, *extra), words)
    assert not out.exists()
    if words == "rank 1 here":   # names the file and the module
        assert rank1_pair[0] in line and "key 'lora_unet_" in line


@pytest.mark.parametrize("wanted", ["foo", "cuda:99", "meta"])
def test_a_device_torch_cannot_use_here_is_one_line(rank1_pair, monkeypatch, wanted):
    """From the environment (every command and host) as from --device: before, a
    RuntimeError or AssertionError traceback from torch."""
    from core.device import default_device
    from core.kernel_matrix import compute_kernel_matrix
    from core.formats import load_lora as load
    monkeypatch.setenv("GRASSMANN_LORA_DEVICE", wanted)
    with pytest.raises(LoraError, match="GRASSMANN_LORA_DEVICE"):
        default_device()
    with pytest.raises(LoraError, match=wanted):
        compute_kernel_matrix([load(p) for p in rank1_pair])


def test_eigh_failure_is_one_line_naming_the_module(rank1_pair, monkeypatch):
    from core.merge import methods, merge
    from core.formats import load_lora as load

    def broken(job, opts):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
    import dataclasses
    monkeypatch.setitem(methods.TABLE, "svd", dataclasses.replace(methods.TABLE["svd"], merge=broken))
    with pytest.raises(LoraError) as err:
        merge([load(p) for p in rank1_pair], None, "svd", 1)
    assert "failed numerically" in str(err.value) and err.value.key.startswith("lora_unet_")
