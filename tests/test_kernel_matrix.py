import json

import numpy as np
import pytest
import torch

from core.device import linalg_threads
from core.errors import LoraError
from core.factored import dense_svd
from core.kernel_matrix import (cluster_kernel_matrix, compute_kernel_matrix,
                                kernel_matrix_from_statistics, pair_statistics)
from core.kernels import CPD, INDEFINITE, KERNELS, PD, make_kernel
from core.plot import NAN_COLOR
from core.synthetic import module_names, perturbed_lora, random_lora
from tests.kernel_reference import brute_kernel, valid_params

SD15_FILES = ["catundchat__pytorch_lora_weights.safetensors", "cloneofsimo__analog_svd_rank4_sd15.safetensors",
              "cloneofsimo__lora_disney_sd15.safetensors", "cloneofsimo__lora_kiriko2_sd15.text_encoder.pt",
              "lycoris__smart_falcon_4_lokr.safetensors", "lycoris__smart_falcon_8_lokr.safetensors"]
SD2_FILES = ["cloneofsimo__lora_illust_sd2.pt", "cloneofsimo__lora_pop_sd2.pt"]


@pytest.fixture(autouse=True)
def one_thread():
    with linalg_threads(1):
        yield


def small_library():
    """Five SD1.5 LoRAs on six small modules (320-wide attention and a TE layer),
    with mixed ranks, one missing module, one dead module, and a related pair."""
    names = module_names("sd1", limit=5) + ["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
    a = random_lora("sd1", 3, seed=1, names=names, path="a.safetensors")
    b = random_lora("sd1", 5, seed=2, names=names, path="b.safetensors")
    c = perturbed_lora(a, 0.3, seed=3, path="c.safetensors")
    d = random_lora("sd1", 4, seed=4, names=names[1:], path="d.safetensors")     # lacks names[0]
    e = random_lora("sd1", 3, seed=5, names=names, path="e.safetensors")
    e.modules[names[2]].up.zero_()                                               # dead module
    return [a, b, c, d, e], names


_DENSE = {}


def dense_bases(lora, name, side):
    """Independent reference: SVD of the dense ΔW, top effective-rank vectors (cached)."""
    key = (id(lora), name, side)
    if key not in _DENSE:
        _DENSE[key] = (lora, _dense_bases(lora, name, side))   # keep lora alive: ids stay unique
    return _DENSE[key][1]


def _dense_bases(lora, name, side):
    m = lora.modules.get(name)
    if m is None:
        return None
    f = dense_svd(m)
    if float(f.S[0]) <= 1e-12:
        return None
    r = int((f.S > 1e-6 * f.S[0]).sum())
    return (f.U if side == "out" else f.V)[:, :r].numpy()


def brute_matrix(loras, names, name, side, params):
    """The documented aggregation, pair by pair, with brute-force kernel values."""
    spec = KERNELS[name]
    sides = ("out", "in") if side == "both" else (side,)
    n = len(loras)
    total, count = np.zeros((n, n)), np.zeros((n, n))
    for module in names:
        for sd in sides:
            bases = [dense_bases(lo, module, sd) for lo in loras]
            live = [i for i in range(n) if bases[i] is not None]
            if spec.embedding != "projection":   # one common dimension per module
                m = min(bases[i].shape[1] for i in live)
                bases = [None if b is None else b[:, :m] for b in bases]
            for i in live:
                for j in live:
                    v = brute_kernel(name, bases[i], bases[j], **params)
                    if spec.form != "log":
                        v /= np.sqrt(brute_kernel(name, bases[i], bases[i], **params)
                                     * brute_kernel(name, bases[j], bases[j], **params))
                    total[i, j] += v
                    count[i, j] += 1
    if spec.form == "log":
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return total / np.sqrt(np.outer(np.diag(count), np.diag(count)))


@pytest.fixture(scope="module")
def library():
    with linalg_threads(1):
        loras, names = small_library()
        stats = {side: pair_statistics(loras, side, binet_cauchy=True, device="cpu")
                 for side in ("out", "in", "both")}
    return loras, names, stats


@pytest.mark.parametrize("name,side", [
    ("projection-rbf", "out"), ("projection-rbf", "in"), ("projection-rbf", "both"),
    ("projection-laplace", "out"), ("projection-poly", "in"), ("projection-binomial", "out"),
    ("projection-log", "both"), ("bc-laplace", "out"), ("bc-poly", "in"), ("bc2-rbf", "both"),
    ("bc2-binomial", "out"), ("bc2-log", "in")])
def test_matrix_matches_brute_force(library, name, side):
    loras, names, stats = library
    params = valid_params(name, 5)
    km = kernel_matrix_from_statistics(stats[side], make_kernel(name, **params))
    ref = brute_matrix(loras, names, name, side, params)
    assert np.allclose(km.matrix, ref, rtol=1e-9, atol=1e-12, equal_nan=True)
    assert np.allclose(km.matrix, km.matrix.T, equal_nan=True)


def test_counts_dead_and_shared(library):
    loras, names, stats = library
    st = stats["out"]
    assert list(st.dead) == [0, 0, 0, 0, 1]
    assert list(st.live) == [6, 6, 6, 5, 5]
    assert st.shared[3, 4] == 4 and st.shared[0, 3] == 5 and st.shared[0, 4] == 5
    assert any("e.safetensors: 1 dead module" in w for w in st.warnings)
    assert len(stats["both"].terms) == 2 * len(stats["out"].terms)


def test_diagonal_and_per_module_values(library):
    loras, names, stats = library
    for name in ("projection-poly", "bc2-poly", "projection-log"):
        kern = make_kernel(name, **valid_params(name, 5))
        km = kernel_matrix_from_statistics(stats["out"], kern)
        assert np.allclose(np.diag(km.matrix), 1.0 if kern.normalisable else 0.0)
        members, values = km.module_kernel(names[1], "out")
        assert np.allclose(values, values.T)
        for pos, i in enumerate(members):
            basis = dense_bases(loras[i], names[1], "out")
            if kern.needs_equal_ranks:
                basis = basis[:, :min(dense_bases(loras[j], names[1], "out").shape[1] for j in members)]
            assert np.isclose(values[pos, pos], brute_kernel(name, basis, basis, **valid_params(name, 5)))


def test_every_labelled_kernel_is_pd_on_random_loras():
    """Mixed ranks, partly shared modules, both sides: PD-labelled kernels give
    min eigenvalue ≥ −1e-8‖K‖; CPD-labelled ones on a uniform library give a
    PSD centred matrix."""
    loras, _ = small_library()
    loras += [perturbed_lora(loras[1], 0.5, seed=9, path="f.safetensors"),
              random_lora("sd1", 2, seed=8, limit=4, text_encoder=False, path="g.safetensors")]
    stats = pair_statistics(loras, "both", binet_cauchy=True, device="cpu")
    uniform = [random_lora("sd1", 3, seed=20 + i, limit=4) for i in range(6)]
    uniform[0] = perturbed_lora(uniform[1], 0.2, seed=7)
    uniform_stats = pair_statistics(uniform, "out", binet_cauchy=True, device="cpu")
    for name, spec in KERNELS.items():
        if spec.status == PD:
            km = kernel_matrix_from_statistics(stats, make_kernel(name, **valid_params(name, 5)))
            assert km.min_eigenvalue >= -1e-8 * np.abs(km.eigenvalues).max(), name
            assert len(km.negative_eigenvalues()) == 0
        elif spec.status == CPD:
            km = kernel_matrix_from_statistics(uniform_stats, make_kernel(name))
            assert km.centred_min_eigenvalue >= -km.tolerance(), name


def test_reusing_statistics_equals_a_fresh_computation(library):
    loras, _, stats = library
    for name, beta in (("projection-laplace", 0.3), ("bc2-rbf", 2.0)):
        fresh = compute_kernel_matrix(loras, name, beta=beta, side="in", device="cpu")
        reused = kernel_matrix_from_statistics(stats["in"], make_kernel(name, beta=beta))
        assert np.allclose(fresh.matrix, reused.matrix, rtol=1e-12)
    proj_only = pair_statistics(loras, "out", device="cpu")
    assert proj_only.terms[0].log_delta is None
    with pytest.raises(ValueError, match="binet_cauchy"):
        kernel_matrix_from_statistics(proj_only, make_kernel("bc-laplace"))


def test_top_k_equalises_ranks(library):
    loras, names, _ = library
    km = compute_kernel_matrix(loras, "projection-rbf", top=2, device="cpu")
    assert km.top == 2
    assert all(set(t.ranks.tolist()) == {2} for t in km.terms)
    full = compute_kernel_matrix(loras, "projection-rbf", device="cpu")
    assert any("ranks differ" in w for w in full.warnings)
    assert not any("ranks differ" in w for w in km.warnings)
    # the reference with each basis cut to its top 2 vectors
    i, j = 0, 1
    vals = [brute_kernel("projection-rbf", dense_bases(loras[i], n, "out")[:, :2],
                         dense_bases(loras[j], n, "out")[:, :2]) for n in names]
    assert np.isclose(km.matrix[i, j], np.mean(vals), rtol=1e-9)


def test_projection_binomial_beta_checked_against_ranks(library):
    _, _, stats = library
    with pytest.raises(LoraError, match="β > p.*5"):
        kernel_matrix_from_statistics(stats["out"], make_kernel("projection-binomial", beta=5.0))


def test_module_filter(library):
    loras, names, _ = library
    km = compute_kernel_matrix(loras, module_filter="attn1_to_[qk]$", device="cpu")
    assert km.modules == [n for n in names if n.endswith(("attn1_to_q", "attn1_to_k"))]
    assert len(km.modules) == 2
    with pytest.raises(LoraError, match="matches no module"):
        compute_kernel_matrix(loras, module_filter="nothing_like_this", device="cpu")
    with pytest.raises(LoraError, match="not a valid regular expression"):
        compute_kernel_matrix(loras, module_filter="attn(", device="cpu")
    with pytest.raises(LoraError, match="no live module.*e.safetensors"):
        compute_kernel_matrix(loras, module_filter=names[2] + "$", device="cpu")


def test_different_bases_are_refused():
    sd1 = random_lora("sd1", 4, seed=1, limit=3, path="one.safetensors")
    sd2 = random_lora("sd2", 4, seed=2, limit=3, path="two.safetensors")
    with pytest.raises(LoraError, match="SD1.x.*SD2.x|SD2.x.*SD1.x"):
        compute_kernel_matrix([sd1, sd2], device="cpu")
    # family unknown, but a module's shape gives the different base away
    sd2.family = "unknown"
    sd2.modules = {n: m for n, m in zip(sd1.modules, sd2.modules.values())}
    shape_differs = [n for n in sd1.modules if sd1.modules[n].d_in != sd2.modules[n].d_in]
    if shape_differs:
        with pytest.raises(LoraError, match="different shapes"):
            compute_kernel_matrix([sd1, sd2], device="cpu")


def test_pairs_sharing_nothing():
    unet = random_lora("sd1", 3, seed=1, limit=3, text_encoder=False, path="unet.safetensors")
    te = random_lora("sd1", 3, seed=2, names=["lora_te_text_model_encoder_layers_0_mlp_fc1"],
                     path="te.safetensors")
    other = random_lora("sd1", 3, seed=3, limit=3, text_encoder=False, path="unet2.safetensors")
    km = compute_kernel_matrix([unet, te, other], device="cpu")
    assert km.matrix[0, 1] == 0.0 and km.shared[0, 1] == 0
    assert any("shares no module" in w and "te.safetensors" in w for w in km.warnings)
    log = compute_kernel_matrix([unet, te, other], "projection-log", device="cpu")
    assert np.isnan(log.matrix[0, 1]) and log.eigenvalues is None
    with pytest.raises(LoraError, match="share no module"):
        cluster_kernel_matrix(log)
    assert json.loads(log.to_json())["matrix"][0][1] is None


def test_each_pair_sharing_nothing_is_named():
    """A and B share no module but each shares one with C: no LoRA is alone, yet
    the pair's 0 is a convention, not a measurement; the warning names the pair,
    the text marks its cells and the heatmap greys them."""
    names = ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
             "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k",
             "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v"]
    a = random_lora("sd1", 3, seed=1, names=names[:1], path="a.safetensors")
    b = random_lora("sd1", 3, seed=2, names=names[1:2], path="b.safetensors")
    c = random_lora("sd1", 3, seed=3, names=names, path="c.safetensors")
    km = compute_kernel_matrix([a, b, c], device="cpu")
    assert km.shared[0, 1] == 0 and km.shared[0, 2] == 1 and km.shared[1, 2] == 1
    assert km.matrix[0, 1] == 0.0
    (warning,) = [w for w in km.warnings if "share no module" in w]
    assert "1 pair(s)" in warning and "a.safetensors / b.safetensors" in warning
    assert not any("with any other LoRA" in w for w in km.warnings)
    text = km.text_summary()
    assert "  none" in text and "the pair shares no module" in text
    img = km.heatmap_image()
    x0, y0, cw, ch = img.info["heatmap_cells"]
    assert img.getpixel((x0 + cw + cw // 2, y0 + ch // 3)) == NAN_COLOR      # row a, column b
    assert img.getpixel((x0 + 2 * cw + cw // 2, y0 + ch // 3)) != NAN_COLOR  # row a, column c


def test_indefinite_kernel_refused_for_clustering_unless_forced(library):
    loras, _, stats = library
    km = kernel_matrix_from_statistics(stats["out"], make_kernel("bc-poly"))
    assert km.kernel.status == INDEFINITE
    with pytest.raises(LoraError, match="not a positive-definite kernel"):
        cluster_kernel_matrix(km, "spectral", k=2)
    forced = cluster_kernel_matrix(km, "spectral", k=2, force=True)
    assert any("forced an indefinite kernel" in w for w in forced.warnings)
    assert len(forced.labels) == len(loras)
    with pytest.raises(LoraError, match="positive integer"):
        compute_kernel_matrix(loras, "projection-poly", alpha=1.5, device="cpu")
    assert compute_kernel_matrix(loras, "projection-poly", alpha=1.5, force=True,
                                 device="cpu").kernel.status == INDEFINITE


def test_a_negative_seed_is_a_one_line_error_asked_for_clusters_or_not(library):
    """numpy's generator refuses a negative seed with a ValueError traceback; the
    automatic k must not turn the refusal into a quiet 'no clustering' note either."""
    from core.kernel_matrix import cluster_as_asked
    _, _, stats = library
    km = kernel_matrix_from_statistics(stats["out"], make_kernel("projection-rbf"))
    for clusters in (2, None):
        with pytest.raises(LoraError, match="seed must be a whole number ≥ 0, got -5"):
            cluster_as_asked(km, clusters, None, "kernel-kmeans", seed=-5)
    assert cluster_as_asked(km, 2, None, "kernel-kmeans", seed=5)[0].k == 2


def test_a_kernel_that_overflows_is_refused_with_its_parameters(library):
    """(β + s)^α beyond float64: a one-line error naming α, never a matrix of n/a
    blamed on pairs that share no module."""
    _, _, stats = library
    with pytest.raises(LoraError, match=r"projection-poly.*α=1e\+06 overflows"):
        kernel_matrix_from_statistics(stats["out"], make_kernel("projection-poly", alpha=1e6))


def test_negative_eigenvalues_are_reported_for_an_indefinite_kernel():
    """Rank-1 LoRAs on one 2-wide module are lines in Gr(1,2): |det| kernels go negative."""
    from core.lora import LoraFile, LoraModule
    loras = []
    for i, a in enumerate(np.arange(12) * np.pi / 12):
        up = torch.tensor([[np.cos(a)], [np.sin(a)]])
        m = LoraModule("lora_unet_x", up, torch.ones(1, 3), weight_shape=(2, 3))
        loras.append(LoraFile(f"line{i}.safetensors", "kohya", "unknown", {"lora_unet_x": m}))
    km = compute_kernel_matrix(loras, "bc-poly", beta=1.0, alpha=2, device="cpu")
    assert km.min_eigenvalue < -0.1
    assert any("negative eigenvalue" in w for w in km.warnings)
    forced = cluster_kernel_matrix(km, "kernel-kmeans", k=3, force=True)
    assert "smallest" in forced.warnings[0]
    assert compute_kernel_matrix(loras, "bc2-poly", device="cpu").min_eigenvalue > -1e-8 * 12 * 4
    # logarithm kernels: zero diagonal, so the matrix always has negative eigenvalues;
    # what counts is the centred matrix: negative for |det| (not CPD), not for det²
    bc_log = compute_kernel_matrix(loras, "bc-log", device="cpu")
    bc2_log = compute_kernel_matrix(loras, "bc2-log", device="cpu")
    assert bc_log.min_eigenvalue < 0 and bc2_log.min_eigenvalue < 0
    assert bc_log.centred_min_eigenvalue < -0.1 and len(bc_log.negative_eigenvalues()) > 0
    assert bc2_log.centred_min_eigenvalue >= -bc2_log.tolerance()
    assert len(bc2_log.negative_eigenvalues()) == 0 and not any("negative" in w for w in bc2_log.warnings)


def test_progress_and_cancel(library):
    loras, names, _ = library
    calls = []
    compute_kernel_matrix(loras, progress=lambda done, total: calls.append((done, total)), device="cpu")
    assert calls[-1] == (len(names), len(names)) and len(calls) == len(names)

    def cancel(done, total):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        compute_kernel_matrix(loras, progress=cancel, device="cpu")


def test_json_heatmap_and_summary(library, tmp_path):
    loras, _, stats = library
    km = kernel_matrix_from_statistics(stats["out"], make_kernel("projection-rbf", beta=0.5))
    result = cluster_kernel_matrix(km, "spectral", k=2)
    data = json.loads(km.to_json(str(tmp_path / "k.json"), result))
    assert data == json.loads((tmp_path / "k.json").read_text())
    assert data["names"] == [lo.name for lo in loras]
    assert data["kernel"] == {"name": "projection-rbf", "status": PD, "formula": "exp(−β(p − s))",
                              "params": {"beta": 0.5}}
    assert np.allclose(data["matrix"], km.matrix)
    assert data["shared_modules"] == km.shared.tolist()
    assert data["min_eigenvalue"] == pytest.approx(km.min_eigenvalue)
    assert data["labels"] == result.labels.tolist() and sorted(data["order"]) == list(range(5))
    # the related pair a, c ends up in one cluster
    assert result.labels[0] == result.labels[2]
    img = km.heatmap_image(result)
    assert img.size[0] > 100 and img.size[1] > 100
    text = km.text_summary(result)
    assert "projection-rbf" in text and "c.safetensors" in text and "spectral clustering" in text


# -- real files ------------------------------------------------------------------------

def test_real_sd15_files_give_a_valid_matrix(real_loras_dir):
    formats = pytest.importorskip("core.formats")
    loras = [formats.load_lora(str(real_loras_dir / f)) for f in SD15_FILES]
    stats = pair_statistics(loras, "out", module_filter="attn", binet_cauchy=True)
    for name in [n for n, s in KERNELS.items() if s.status == PD]:
        km = kernel_matrix_from_statistics(stats, make_kernel(name, **valid_params(name, 64)))
        assert np.allclose(km.matrix, km.matrix.T) and np.allclose(np.diag(km.matrix), 1.0)
        assert km.min_eigenvalue >= -1e-8 * np.abs(km.eigenvalues).max()
        assert np.all(np.isfinite(km.matrix))
    lokr = [i for i, f in enumerate(SD15_FILES) if "lokr" in f]
    assert all(km.dead[i] == 0 for i in lokr)     # the 3 dead LoKr modules are resnets, not attn
    assert km.shared[SD15_FILES.index("catundchat__pytorch_lora_weights.safetensors"),
                     SD15_FILES.index("cloneofsimo__lora_kiriko2_sd15.text_encoder.pt")] == 0


def test_real_sd2_and_sd15_are_never_compared(real_loras_dir):
    formats = pytest.importorskip("core.formats")
    loras = [formats.load_lora(str(real_loras_dir / f)) for f in SD15_FILES[1:3] + SD2_FILES]
    with pytest.raises(LoraError, match="SD2"):
        compute_kernel_matrix(loras)
    sd2 = compute_kernel_matrix(loras[2:], device="cpu")        # the two SD2 files alone are fine
    assert sd2.dead.tolist() == [32, 32] and np.allclose(np.diag(sd2.matrix), 1.0)


def test_cli_on_saved_files(tmp_path, capsys):
    pytest.importorskip("core.formats")
    from core.cli import main
    from core.save import save_kohya
    bases = [random_lora("sd1", 3, seed=40 + b, limit=4) for b in range(2)]
    for b in range(2):
        for i in range(3):
            save_kohya(perturbed_lora(bases[b], 0.2, seed=10 * b + i), str(tmp_path / f"l{b}{i}.safetensors"))
    (tmp_path / "notes.txt").write_text("not a LoRA")
    out_json, out_png = tmp_path / "out" / "k.json", tmp_path / "out" / "k.png"
    # the CLI never creates a missing output folder (a typo would scatter files)
    assert main(["kernel", str(tmp_path), "--json", str(out_json)]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    rc = main(["kernel", str(tmp_path), "--beta", "0.5", "--json", str(out_json),
               "--heatmap", str(out_png)])
    assert rc == 0
    data = json.loads(out_json.read_text())
    assert len(data["names"]) == 6 and data["clustering"]["auto_k"]
    labels = data["labels"]
    assert labels[0] == labels[1] == labels[2] != labels[3] == labels[4] == labels[5]
    assert out_png.stat().st_size > 1000
    assert "k by eigengap" in capsys.readouterr().out
    assert main(["kernel", str(tmp_path), "--kernel", "bc-poly", "--clusters", "2"]) == 2
    assert "not a positive-definite kernel" in capsys.readouterr().err
    assert main(["kernel", str(tmp_path), "--kernel", "bc-binomial", "--beta", "1"]) == 2
    assert main(["kernel", str(tmp_path), "--dbscan", "0.8", "2"]) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(library):
    loras, _, stats = library
    gpu = pair_statistics(loras, "both", binet_cauchy=True, device="cuda")
    for name in ("projection-rbf", "bc2-poly"):
        kern = make_kernel(name, **valid_params(name, 5))
        assert np.allclose(kernel_matrix_from_statistics(gpu, kern).matrix,
                           kernel_matrix_from_statistics(stats["both"], kern).matrix, rtol=1e-9)
