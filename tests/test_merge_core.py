"""Core-space merges (ties/dare in core coordinates, tsv, iso-c, iso-cts,
knots-ties/dare) against independent dense implementations of their
definitions on the nonzero spectrum; span containment, invariances,
truncation and rank auto, real SD1.5 modules, bad parameters."""
import numpy as np
import pytest
import torch

from core.errors import LoraError
from core.lora import LoraFile, LoraModule
from core.merge import merge
from core.merge.core_space import iso_cts_split
from core.merge.ties_dare import dare_generators
from core.synthetic import perturbed_lora, random_lora

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",     # 320×320
         "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",     # 320×768
         "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj"]  # 2560×320
W = [0.7, -0.4, 0.5]
CORE = ("ties", "dare", "tsv", "iso-c", "iso-cts", "knots-ties", "knots-dare")
RTOL = 1e-6
ZERO = 1e-6          # nonzero spectrum: σ > ZERO·σ_1, as core.factored.RANK_RTOL


def sources(ranks=(4, 3, 5), related=True):
    a = random_lora("sd1", rank=ranks[0], seed=1, names=NAMES, path="a.safetensors")
    b = (perturbed_lora(a, 0.5, 2, path="b.safetensors") if related else
         random_lora("sd1", rank=ranks[1], seed=2, names=NAMES, path="b.safetensors"))
    c = random_lora("sd1", rank=ranks[2], seed=3, names=NAMES, path="c.safetensors")
    return [a, b, c]


def rel(a, b):
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


def dense_svd(x):
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    live = s > ZERO * s[0]
    return u[:, live], s[live], vh[live].T


def dense_polar(x):
    w, _, z = dense_svd(x)
    return w @ z.T


def taus(srcs, w, name):
    return [wk * s.modules[name].delta().to(F64) for s, wk in zip(srcs, w)]


def np_ties(mats, density):
    """TIES as PEFT spells it, in numpy: keep each matrix's round(density·n) largest
    magnitudes, elect the sign of the sum, average the kept entries agreeing with it."""
    kept = []
    for m in mats:
        a = m.numpy()
        k = max(1, int(np.floor(density * a.size + 0.5)))
        th = np.sort(np.abs(a).ravel())[::-1][k - 1]
        kept.append(np.where(np.abs(a) >= th, a, 0.0))
    kept = np.stack(kept)
    sign = np.sign(kept.sum(0))
    agree = (np.sign(kept) == sign) & (kept != 0)
    return torch.from_numpy((kept * agree).sum(0) / np.maximum(agree.sum(0), 1))


def np_dare(mats, drop, name, seed, labels):
    import zlib
    tags = [zlib.crc32(f"{lab}#0".encode()) for lab in labels]
    out = torch.zeros_like(mats[0])
    for m, g in zip(mats, dare_generators(name, seed, tags, mats[0].device)):
        keep = torch.rand(m.shape, generator=g, dtype=torch.float32) >= drop
        out += m * keep
    return out / (1 - drop)


def dense_reference(method, ts, p, density=0.4, drop=0.3, name="", seed=0, labels=()):
    """The method's definition on dense matrices (nonzero spectrum), truncated to p."""
    if method in ("ties", "dare"):
        u, _, _ = dense_svd(torch.cat(ts, 1))
        v, _, _ = dense_svd(torch.cat([t.T for t in ts], 1))
        ms = [u.T @ t @ v for t in ts]
        m = np_ties(ms, density) if method == "ties" else np_dare(ms, drop, name, seed, labels)
        out = u @ m @ v.T
    elif method in ("knots-ties", "knots-dare"):
        u, _, _ = dense_svd(torch.cat(ts, 1))
        blocks = [u.T @ t for t in ts]
        out = u @ (np_ties(blocks, density) if method == "knots-ties" else np_dare(blocks, drop, name, seed, labels))
    elif method == "tsv":
        svds = [dense_svd(t) for t in ts]
        out = (dense_polar(torch.cat([x[0] for x in svds], 1)) * torch.cat([x[1] for x in svds])) @ \
            dense_polar(torch.cat([x[2] for x in svds], 1)).T
    elif method == "iso-c":
        u, s, v = dense_svd(sum(ts))
        u, v = u[:, :p], v[:, :p]            # the rule's own order: the sum's top directions first
        return s.mean() * u @ v.T
    elif method == "iso-cts":
        c, per = iso_cts_split(p, len(ts))
        u, s, v = dense_svd(sum(ts))
        us, ss, vs = [u[:, :c]], [s[:c]], [v[:, :c]]
        for t in ts:
            ut, st, vt = dense_svd(t - u[:, :c] @ (u[:, :c].T @ t))
            us.append(ut[:, :per]), ss.append(st[:per]), vs.append(vt[:, :per])
        s_all = torch.cat(ss)
        return s_all.mean() * dense_polar(torch.cat(us, 1)) @ dense_polar(torch.cat(vs, 1)).T
    u, s, v = dense_svd(out)
    return (u[:, :p] * s[:p]) @ v[:, :p].T


@pytest.mark.parametrize("method", CORE)
def test_core_methods_equal_their_dense_definitions(method):
    srcs = sources()
    p = 12 if method != "iso-cts" else 10
    res = merge(srcs, W, method=method, rank=p, ties_density=0.4, dare_drop=0.3, seed=7, dtype=F64)
    for name in NAMES:
        ref = dense_reference(method, taus(srcs, W, name), p, 0.4, 0.3, name, 7, [s.name for s in srcs])
        assert rel(res.lora.modules[name].delta(), ref) < RTOL, name


@pytest.mark.parametrize("method", CORE)
def test_nothing_outside_the_sources_spans_and_invariances(method):
    srcs = sources()
    res = merge(srcs, W, method=method, rank=9, seed=3, dtype=F64)
    g = torch.Generator().manual_seed(0)
    repar = LoraFile(srcs[1].path, srcs[1].format, srcs[1].family)
    for name, m in srcs[1].modules.items():           # up·G, G⁻¹·down: the same ΔW
        gm = torch.randn(m.factor_rank, m.factor_rank, generator=g, dtype=F64) + 3 * torch.eye(m.factor_rank, dtype=F64)
        repar.modules[name] = LoraModule(name, m.up.double() @ gm, torch.linalg.solve(gm, m.down.double()),
                                         m.scale, m.rank, m.alpha, m.weight_shape)
    other = merge([srcs[2], repar, srcs[0]], W[::-1], method=method, rank=9, seed=3, dtype=F64)
    for name in NAMES:
        d = res.lora.modules[name].delta()
        ts = taus(srcs, W, name)
        u, _, _ = dense_svd(torch.cat(ts, 1))
        v, _, _ = dense_svd(torch.cat([t.T for t in ts], 1))
        assert float(torch.linalg.matrix_norm(d - u @ (u.T @ d))) < 1e-9 * float(torch.linalg.matrix_norm(d))
        if not method.startswith("knots"):          # KnOTS merges its blocks in the layer's input coordinates
            assert float(torch.linalg.matrix_norm(d - (d @ v) @ v.T)) < 1e-9 * float(torch.linalg.matrix_norm(d))
        assert rel(other.lora.modules[name].delta(), d) < 1e-8, name


@pytest.mark.parametrize("method", ["ties", "tsv", "knots-ties", "dare"])
def test_identical_sources_give_the_source_back(method):
    a = random_lora("sd1", rank=4, seed=1, names=NAMES, path="a.safetensors")
    b = LoraFile("b.safetensors", a.format, a.family, dict(a.modules))
    w = [0.5, 0.5] if method == "dare" else [1.0, 1.0]        # ties: disjoint mean; tsv: polar of [P P]
    res = merge([a, b], w, method=method, rank=4, ties_density=1.0, dare_drop=0.0, dtype=F64)
    for name in NAMES:
        assert rel(res.lora.modules[name].delta(), a.modules[name].delta().double()) < 1e-9


def test_truncation_and_rank_auto_follow_the_result_spectrum():
    srcs = sources()
    full = merge(srcs, W, method="tsv", rank=13, dtype=F64)       # Σ r_k = 4 + 4 + 5
    cut = merge(srcs, W, method="tsv", rank=5, dtype=F64)
    auto = merge(srcs, W, method="tsv", rank="auto", energy=0.9, dtype=F64)
    for k, name in enumerate(NAMES):
        u, s, v = dense_svd(full.lora.modules[name].delta())
        assert rel(cut.lora.modules[name].delta(), (u[:, :5] * s[:5]) @ v[:, :5].T) < 1e-8
        assert cut.report.modules[k].truncation == pytest.approx(float(s[5:].norm() / s.norm()), rel=1e-8)
        share = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
        want = int((share < 0.9 - 1e-12).sum()) + 1
        assert auto.report.modules[k].rank == want and auto.report.modules[k].truncation <= (0.1 ** 0.5) + 1e-12
    svd_auto = merge(srcs, W, method="svd", rank="auto", energy=0.95, dtype=F64)
    for k, name in enumerate(NAMES):
        _, s, _ = dense_svd(sum(taus(srcs, W, name)))
        share = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
        assert svd_auto.report.modules[k].rank == int((share < 0.95 - 1e-12).sum()) + 1


def test_real_sd15_modules_tsv_iso_ties_against_dense(real_loras_dir):
    formats = pytest.importorskip("core.formats")
    files = ("cloneofsimo__analog_svd_rank4_sd15.safetensors", "cloneofsimo__lora_disney_sd15.safetensors")
    loras = [formats.load_lora(str(real_loras_dir / f)) for f in files]
    shared = [n for n in loras[0].modules if n in loras[1].modules][:4]
    few = [LoraFile(l.path, l.format, l.family, {n: l.modules[n] for n in shared}) for l in loras]
    w = [0.6, 0.8]
    for method in ("tsv", "iso-c", "ties", "knots-ties"):
        res = merge(few, w, method=method, rank=4, ties_density=0.4, dtype=F64)
        for name in shared:
            ts = [wk * l.modules[name].delta().to(F64).reshape(l.modules[name].d_out, -1) for l, wk in zip(few, w)]
            ref = dense_reference(method, ts, 4, 0.4)
            got = res.lora.modules[name].delta().reshape(ref.shape)
            assert rel(got, ref) < RTOL, (method, name)


def test_space_full_keeps_the_dense_rules_and_core_is_the_default():
    srcs = sources()
    core = merge(srcs, W, method="ties", rank=6, dtype=F64)
    full = merge(srcs, W, method="ties", rank=6, space="full", dtype=F64)
    assert json_method(core) == ("ties", "core") and json_method(full) == ("ties", "full")
    assert rel(core.lora.modules[NAMES[0]].delta(), full.lora.modules[NAMES[0]].delta()) > 1e-3


def json_method(res):
    return res.recipe["method"], res.recipe["space"]


def test_bad_parameters_are_one_line_errors():
    srcs = sources()
    cases = [(dict(method="ties", ties_density=1.5), "ties density must be in"),
             (dict(method="knots-ties", ties_density=0.0), "ties density must be in"),
             (dict(method="dare", dare_drop=1.0), "dare drop probability"),
             (dict(method="tsv", keep=0.0), "tsv keep"),
             (dict(method="ties", space="half"), "space 'half' is not offered"),
             (dict(method="linear", rank="auto"), "exact at rank"),
             (dict(method="ties", rank="auto", space="full"), "space full"),
             (dict(method="tsv", rank="most"), "whole number or 'auto'"),
             (dict(method="tsv", rank="auto", energy=1.5), "energy share")]
    for kw, msg in cases:
        with pytest.raises(LoraError, match=msg) as err:
            merge(srcs, kw.pop("weights", W), **kw)
        assert "\n" not in str(err.value)


def test_cli_node_and_report_show_the_method_table(tmp_path, capsys):
    import argparse

    from core.cli import main
    from core.commands import merge as command
    from core.merge import TABLE, describe
    from core.save import save_kohya

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    action = next(a for a in parser._actions if a.dest == "method")
    assert list(action.choices) == list(TABLE)
    assert all(m.description.replace("%", "%%") in action.help for m in TABLE.values())
    srcs = sources()
    res = merge(srcs, [0.5, 0.3, 0.2], method="iso-cts", rank=6)
    assert TABLE["iso-cts"].description in res.report.table() and "iso-cts merge" in res.report.table()
    assert "iso-cts:" in describe() and TABLE["iso-cts"].paper in describe()
    paths = [save_kohya(s, str(tmp_path / f"s{k}.safetensors")) for k, s in enumerate(srcs)]
    for bad in (["--method", "ties", "--ties-density", "1.5"], ["--method", "tsv", "--keep", "0"],
                ["--method", "knots-dare", "--dare-drop", "1"]):
        assert main(["merge", *paths, "-o", str(tmp_path / "x.safetensors"), *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ")


def test_polar_from_the_gram_or_the_svd():
    """polar(): the Gram's eigendecomposition for a well-conditioned X, the SVD
    otherwise (rank-deficient: orthonormal flag off, nothing outside range(X))."""
    from core.merge.core_space import POLAR_MIN_RATIO, polar
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 12, generator=g, dtype=F64)
    ill = x * torch.logspace(0, -3, 12, dtype=F64)                 # κ ≈ 1e3 > 1/POLAR_MIN_RATIO
    deficient = torch.cat([x[:, :6], x[:, :6]], 1)
    for m, full in ((x, True), (ill, True), (deficient, False)):
        w, ok = polar(m)
        assert ok == full
        assert rel(w, dense_polar(m)) < 1e-12
    assert 1 / POLAR_MIN_RATIO < 1e3


@pytest.mark.parametrize("method", ["ties", "dare", "knots-ties"])
def test_core_rule_truncation_is_the_tail_of_its_full_result(method):
    """ties/dare/knots at rank p (top-p triplets of the merged core or blocks by one eigh): the
    rank-p part of the full result, truncation figure ‖S[p:]‖/‖S‖ of its spectrum."""
    srcs = sources()
    full = merge(srcs, W, method=method, rank=13, seed=5, dtype=F64)      # Σ r_k = 4 + 4 + 5
    cut = merge(srcs, W, method=method, rank=5, seed=5, dtype=F64)
    for k, name in enumerate(NAMES):
        u, s, v = dense_svd(full.lora.modules[name].delta())
        assert rel(cut.lora.modules[name].delta(), (u[:, :5] * s[:5]) @ v[:, :5].T) < 1e-9
        assert cut.report.modules[k].truncation == pytest.approx(float(s[5:].norm() / s.norm()), rel=1e-9)
