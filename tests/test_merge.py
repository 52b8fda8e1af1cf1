"""Merges against dense references on small real-shaped modules (LoCon convs,
cross-attention, MLP): exactness of linear/svd, the Karcher construction,
TIES/DARE promises, the factored fidelity report, saving and bad input."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from scipy.linalg import subspace_angles

from core.errors import LoraError
from core.factored import dense_svd
from core.karcher import karcher_mean
from core.lora import LoraFile, LoraModule
from core.merge import RECIPE_KEY, dare_combine, merge, ties_combine, ties_threshold
from core.save import save_kohya
from core.synthetic import perturbed_lora, random_lora

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")   # dense references on one thread too
NAMES = [
    "lora_unet_down_blocks_0_resnets_0_conv1",                                   # 3×3 conv, 320×2880
    "lora_unet_down_blocks_0_attentions_0_proj_in",                              # 1×1 conv
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",      # 320×320
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",      # 320×768
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",   # 2560×320
]


def lora(seed, rank=4, names=NAMES, path=None, alpha=None):
    out = random_lora("sd1", rank=rank, seed=seed, names=names, alpha=alpha)
    out.path = path or f"lora{seed}.safetensors"
    return out


def related(base, eps, seed):
    return perturbed_lora(base, eps, seed, path=f"related{seed}.safetensors")


def target(loras, weights, name):
    return sum(w * l.modules[name].delta() for l, w in zip(loras, weights) if name in l.modules)


def rel(a, b):
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


def max_angle(a, b):
    return float(subspace_angles(np.asarray(a), np.asarray(b)).max())


# ---------------------------------------------------------------- exactness
SELF_CASES = [(m, w) for m in ("karcher", "linear", "concat", "svd")
              for w in ((0.5, 0.5), (0.3, 0.7), (1.2, -0.2))
              if not (m == "karcher" and min(w) < 0)]      # karcher refuses negative weights (below)


@pytest.mark.parametrize("method,weights", SELF_CASES)
def test_merging_a_lora_with_itself_returns_it(method, weights):
    a = lora(1, alpha=2.0)
    res = merge([a, a], weights, method=method)
    for name, m in a.modules.items():
        assert rel(res.lora.modules[name].delta(), m.delta()) < 1e-5
    assert res.report.summary()["rel_error"] < 1e-10


@pytest.mark.parametrize("method", ["linear", "concat"])
def test_linear_is_exact_weighted_sum_at_summed_rank(method):
    srcs = [lora(1, rank=4), lora(2, rank=6), lora(3, rank=2, alpha=1.0)]
    w = [0.7, -0.4, 1.5]
    res = merge(srcs, w, method=method)
    for name in NAMES:
        m = res.lora.modules[name]
        assert m.factor_rank == 12 and m.weight_shape == srcs[0].modules[name].weight_shape
        assert rel(m.delta(), target(srcs, w, name)) < 1e-6     # float32 factors
    rep = res.report
    assert rep.summary()["rel_error"] < 1e-12                   # report works in float64
    assert all(m.status == "merged" for m in rep.modules)


@pytest.mark.parametrize("rank", [3, 7])
def test_svd_equals_dense_truncation_of_the_sum(rank):
    srcs = [lora(1, rank=4), lora(2, rank=6)]
    w = [1.0, 0.6]
    res = merge(srcs, w, method="svd", rank=rank, dtype=F64)
    for name in NAMES:
        t = target(srcs, w, name)
        u, s, vh = torch.linalg.svd(t, full_matrices=False)
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        got = res.lora.modules[name].delta()
        assert rel(got, best) < 1e-5
        # and the reported error is Eckart–Young's tail
        mod = next(m for m in res.report.modules if m.name == name)
        assert abs(mod.rel_error - float(s[rank:].norm() / s.norm())) < 1e-9


@pytest.mark.parametrize("method", ["karcher", "svd", "ties", "linear", "knots-ties"])
def test_report_fidelity_matches_dense_computation(method):
    a = lora(1)
    srcs = [a, related(a, 0.3, 2), lora(3)]
    w = [0.5, 0.3, 0.4]
    res = merge(srcs, w, method=method, dtype=F64)
    for mod in res.report.modules:
        t = target(srcs, w, mod.name)
        dm = res.lora.modules[mod.name].delta()
        assert abs(mod.rel_error - rel(dm, t)) < 1e-9
        u, s, vh = torch.linalg.svd(dm, full_matrices=False)
        k = int((s > 1e-10 * s[0]).sum())
        for idx, src in enumerate(srcs):
            dw = src.modules[mod.name].delta()     # ‖P_U ΔW P_V‖ = ‖UᵀΔWV‖ for orthonormal U, V
            kept = float(torch.linalg.matrix_norm(u[:, :k].T @ dw @ vh[:k].T) ** 2 / torch.linalg.matrix_norm(dw) ** 2)
            assert abs(mod.kept[idx] - kept) < 1e-9
            us = dense_svd(src.modules[mod.name]).U
            phi = float(np.sum(np.cos(subspace_angles(u[:, :k].numpy(), us.numpy())) ** 2)) / min(k, us.shape[1])
            assert abs(mod.phi[idx] - phi) < 1e-9


def _rank_deficient(base, seed, side):
    """base's modules with two equal down rows (ΔW's column space smaller than
    span(up)) or two proportional up columns."""
    out = LoraFile(f"deficient{seed}.safetensors", base.format, base.family)
    for name, m in base.modules.items():
        up, down = m.up.clone(), m.down.clone()
        if side == "down":
            down[1] = down[0]
        else:
            up[:, 2] = 2 * up[:, 3]
        out.modules[name] = LoraModule(name, up, down, m.scale, m.rank, m.alpha, m.weight_shape, m.kind)
    return out


@pytest.mark.parametrize("method,third", [("svd", 6), ("linear", 5), ("ties", 6), ("iso-cts", 5), ("knots-dare", 6)])
def test_report_from_gram_blocks_equals_the_svd_path_and_dense(method, third, monkeypatch):
    """Sources whose Grams are well conditioned are measured from Cholesky factors
    of their Gram blocks (no per-source SVD; one batched call when the ranks are
    equal, else one per source); rank-deficient ones take their SVD. Both give
    the report the dense definitions give, and the same merge."""
    import core.merge.basis as basis
    a = lora(1, rank=6)
    srcs = [a, related(a, 0.3, 2), _rank_deficient(lora(3, rank=third), 3, "down"),
            _rank_deficient(related(a, 0.5, 4), 4, "up")]
    w = [0.4, 0.3, 0.2, 0.3]
    rank = None if method == "linear" else 4
    taken = []
    real = basis.gram_factored
    monkeypatch.setattr(basis, "gram_factored", lambda *args: taken.extend(real(*args)) or taken[-len(args[2]):])
    fast = merge(srcs, w, method=method, rank=rank, dtype=F64, workers=1)    # one worker: calls in module order
    # per module: the two full-rank sources from their Grams, the two deficient ones by their SVD
    assert [x is not None for x in taken] == [True, True, False, False] * len(NAMES)
    monkeypatch.setattr(basis, "gram_factored", lambda a, b, scales, rows: [None] * len(scales))   # all by SVDs
    exact = merge(srcs, w, method=method, rank=rank, dtype=F64)
    for mf, me in zip(fast.report.modules, exact.report.modules):
        dm = fast.lora.modules[mf.name].delta()
        assert rel(dm, exact.lora.modules[me.name].delta()) < 1e-10
        assert abs(mf.rel_error - me.rel_error) < 1e-12
        assert mf.advice["advice"] == me.advice["advice"]
        assert abs(mf.advice["phi"] - me.advice["phi"]) < 1e-10
        assert abs(mf.advice["max_angle_deg"] - me.advice["max_angle_deg"]) < 1e-6
        u, s, vh = torch.linalg.svd(dm, full_matrices=False)
        k = int((s > 1e-10 * s[0]).sum())
        for idx, src in enumerate(srcs):
            dw = src.modules[mf.name].delta()
            energy = float(torch.linalg.matrix_norm(dw) ** 2)
            kept = float(torch.linalg.matrix_norm(u[:, :k].T @ dw @ vh[:k].T) ** 2) / energy
            us = dense_svd(src.modules[mf.name])
            us = us.U[:, :us.effective_rank]           # the deficient ones: 5 directions, not 6
            phi = float(np.sum(np.cos(subspace_angles(u[:, :k].numpy(), us.numpy())) ** 2)) / min(k, us.shape[1])
            for got in (mf, me):
                assert abs(got.energy[idx] - energy) < 1e-10 * energy
                assert abs(got.kept[idx] - kept) < 1e-9
                assert abs(got.phi[idx] - phi) < 1e-9


# ---------------------------------------------------------------- karcher
def test_karcher_merge_is_projection_of_sum_onto_mean_subspaces():
    """ΔW_merge = U*U*ᵀ(Σ w_k ΔW_k)V*V*ᵀ with U*, V* the Karcher means of the
    dense-SVD top-p bases: checks the core and its split independently."""
    a = lora(1, rank=6)
    srcs = [a, related(a, 0.2, 2), related(a, 0.4, 3)]
    w = [0.2, 0.5, 0.8]
    p = 4
    res = merge(srcs, w, method="karcher", rank=p, dtype=F64)
    for name in NAMES:
        svds = [dense_svd(s.modules[name]) for s in srcs]
        u = karcher_mean(torch.stack([d.U[:, :p] for d in svds]), w).mean
        v = karcher_mean(torch.stack([d.V[:, :p] for d in svds]), w).mean
        ref = u @ (u.T @ target(srcs, w, name) @ v) @ v.T
        m = res.lora.modules[name]
        assert m.factor_rank == p and m.scale == 1.0 and m.alpha == p
        assert rel(m.delta(), ref) < 1e-8
        assert max_angle(torch.linalg.svd(m.delta(), full_matrices=False)[0][:, :p], u) < 1e-7


def test_karcher_merge_independent_of_order_and_factor_basis():
    a = lora(1, rank=5)
    srcs = [a, related(a, 0.1, 2), related(a, 0.15, 3)]
    w = [1.0, 0.5, 0.75]
    ref = merge(srcs, w, method="karcher", rank=4, dtype=F64)
    flipped = merge(srcs[::-1], w[::-1], method="karcher", rank=4, dtype=F64)
    g = torch.Generator().manual_seed(9)
    repar = LoraFile(path="repar.safetensors", format="kohya", family="sd1")
    for name, m in srcs[1].modules.items():        # up·G, G⁻¹·down: same ΔW, other factors
        gm = torch.randn(m.factor_rank, m.factor_rank, generator=g, dtype=F64) + 3 * torch.eye(m.factor_rank, dtype=F64)
        repar.modules[name] = LoraModule(name, m.up.double() @ gm, torch.linalg.solve(gm, m.down.double()),
                                         m.scale, m.rank, m.alpha, m.weight_shape)
    other = merge([srcs[0], repar, srcs[2]], w, method="karcher", rank=4, dtype=F64)
    for name in NAMES:
        d = ref.lora.modules[name].delta()
        assert rel(flipped.lora.modules[name].delta(), d) < 1e-7
        assert rel(other.lora.modules[name].delta(), d) < 1e-7
    assert all(s["unique"] and s["converged"] for m in ref.report.modules for s in m.karcher.values())


def test_batched_karcher_merge_equals_module_by_module(monkeypatch):
    """The CUDA default (modules of one coordinate shape stacked, flushed every
    KARCHER_BATCH) gives the module-by-module result, in module order."""
    import core.merge.run as cm
    a = lora(1, rank=4)
    srcs = [a, related(a, 0.2, 2), related(a, 0.3, 3)]
    monkeypatch.setattr(cm, "KARCHER_BATCH", 2)
    one = merge(srcs, [0.5, 0.3, 0.2], method="karcher", dtype=F64, batched=False)
    many = merge(srcs, [0.5, 0.3, 0.2], method="karcher", dtype=F64, batched=True)
    assert list(many.lora.modules) == list(one.lora.modules) == NAMES
    for name in NAMES:
        assert rel(many.lora.modules[name].delta(), one.lora.modules[name].delta()) < 1e-10
    assert [m.name for m in many.report.modules] == NAMES


def test_karcher_of_unrelated_loras_warns_not_unique_and_stays_finite():
    srcs = [lora(1, rank=4), lora(2, rank=4), lora(3, rank=4)]
    res = merge(srcs, [1, 1, 1], method="karcher", max_iter=15)
    assert any("not unique" in w and "deterministic choice" in w for w in res.report.warnings)
    assert res.report.summary()["karcher"]["not_unique"] == len(NAMES)
    for m in res.lora.modules.values():
        assert torch.isfinite(m.up).all() and torch.isfinite(m.down).all()
        assert torch.linalg.matrix_rank(m.delta()) == 4
    again = merge(srcs, [1, 1, 1], method="karcher", max_iter=15)
    for name in NAMES:
        assert torch.equal(again.lora.modules[name].up, res.lora.modules[name].up)
    assert "not unique" in res.report.table()


def test_chordal_karcher_uses_extrinsic_mean():
    a = lora(1)
    srcs = [a, related(a, 0.3, 2)]
    geo = merge(srcs, [1, 1], method="karcher", dtype=F64)
    cho = merge(srcs, [1, 1], method="karcher", distance="chordal", dtype=F64)
    assert cho.report.distance == "chordal"
    # two equal-weight points: the chordal and geodesic means coincide (math.md)
    for name in NAMES:
        assert rel(cho.lora.modules[name].delta(), geo.lora.modules[name].delta()) < 1e-7


# ---------------------------------------------------------------- TIES / DARE
def test_ties_trim_elect_and_disjoint_mean_on_hand_made_case():
    t1 = torch.tensor([[4.0, -1.0, 0.5], [-3.0, 2.0, 0.1]], dtype=F64)
    t2 = torch.tensor([[-2.0, -5.0, 0.2], [1.0, 0.3, -6.0]], dtype=F64)
    t3 = torch.tensor([[1.0, 0.4, -0.3], [2.5, -0.2, 3.0]], dtype=F64)
    taus, density = [t1, t2, t3], 0.5
    ths = [ties_threshold(t, density) for t in taus]
    assert ths == [2.0, 2.0, 1.0]           # 3rd-largest magnitudes: {4,3,2}, {6,5,2}, {3,2.5,1}
    kept = [(t.abs() >= th) for t, th in zip(taus, ths)]
    assert [int(k.sum()) for k in kept] == [3, 3, 3]     # half of 6 entries each
    got = ties_combine(taus, ths)
    # entry by entry: trimmed values, elected sign of their sum, mean of the agreeing ones
    for i in range(2):
        for j in range(3):
            vals = [float(t[i, j]) for t, k in zip(taus, kept) if k[i, j]]
            sign = np.sign(sum(vals))
            agree = [v for v in vals if np.sign(v) == sign and v != 0]
            assert float(got[i, j]) == pytest.approx(sum(agree) / len(agree) if agree else 0.0)
    # spelled out: (0,0) keeps 4, −2, 1 → sign + → (4+1)/2; (1,2) keeps −6, 3 → sign − → −6
    assert float(got[0, 0]) == 2.5 and float(got[1, 2]) == -6.0


def test_ties_and_dare_rank_p_equals_dense_svd_truncation():
    srcs = [lora(1, rank=4, names=[NAMES[0], NAMES[4]]), lora(2, rank=4, names=[NAMES[0], NAMES[4]])]
    w = [1.0, 0.7]
    full = {m: merge(srcs, w, method=m, rank=320, seed=5, space="full", dtype=F64) for m in ("ties", "dare")}
    for method in ("ties", "dare"):
        res = merge(srcs, w, method=method, rank=6, seed=5, space="full", dtype=F64)
        for name in (NAMES[0], NAMES[4]):
            dense = full[method].lora.modules[name].delta()
            u, s, vh = torch.linalg.svd(dense, full_matrices=False)
            assert rel(res.lora.modules[name].delta(), (u[:, :6] * s[:6]) @ vh[:6]) < 1e-8


def test_ties_and_dare_in_float32_agree_with_float64():
    """A float32 result computes the dense step in float32: same masks, same
    trimming, rank-p triplets to float32 accuracy."""
    srcs = [lora(1, rank=4, names=[NAMES[0], NAMES[4]]), lora(2, rank=4, names=[NAMES[0], NAMES[4]])]
    for method in ("ties", "dare"):
        lo = merge(srcs, [1.0, 0.7], method=method, rank=6, seed=5, space="full", dtype=torch.float32)
        hi = merge(srcs, [1.0, 0.7], method=method, rank=6, seed=5, space="full", dtype=F64)
        for name in (NAMES[0], NAMES[4]):
            assert lo.lora.modules[name].up.dtype == torch.float32
            assert rel(lo.lora.modules[name].delta(), hi.lora.modules[name].delta()) < 1e-4
        assert abs(lo.report.summary()["rel_error"] - hi.report.summary()["rel_error"]) < 1e-5


def test_ties_merge_at_full_rank_equals_dense_ties():
    srcs = [lora(1, rank=3, names=NAMES[2:4]), lora(2, rank=3, names=NAMES[2:4])]
    w = [1.0, 0.7]
    res = merge(srcs, w, method="ties", rank=320, ties_density=0.3, space="full", dtype=F64)
    for name in NAMES[2:4]:
        taus = [wk * s.modules[name].delta() for s, wk in zip(srcs, w)]
        ref = ties_combine(taus, [ties_threshold(t, 0.3) for t in taus])
        assert rel(res.lora.modules[name].delta(), ref) < 1e-8
        nz = [float((t.abs() >= ties_threshold(t, 0.3)).double().mean()) for t in taus]
        assert all(abs(f - 0.3) < 1e-3 for f in nz)


def tiny(seed, d_out=12, d_in=10, r=3):
    g = torch.Generator().manual_seed(seed)
    m = LoraModule("m", torch.randn(d_out, r, generator=g, dtype=F64),
                   torch.randn(r, d_in, generator=g, dtype=F64))
    return LoraFile(path=f"tiny{seed}.safetensors", format="kohya", modules={"m": m})


def test_dare_expectation_is_the_weighted_sum_and_seeds_reproduce():
    srcs, w, q, n = [tiny(1), tiny(2)], [0.8, 0.5], 0.5, 300
    t = target(srcs, w, "m")
    runs = [merge(srcs, w, method="dare", rank=10, dare_drop=q, seed=s, space="full", dtype=F64
                  ).lora.modules["m"].delta() for s in range(n)]
    mean = torch.stack(runs).mean(0)
    # E‖mean − T‖² = q/(1−q)/n · Σ_k ‖w_k ΔW_k‖²: the Monte-Carlo error must have that size
    expected = math.sqrt(q / (1 - q) / n * sum(float(torch.linalg.matrix_norm(wk * s.modules["m"].delta()) ** 2)
                                               for s, wk in zip(srcs, w)))
    err = float(torch.linalg.matrix_norm(mean - t))
    assert 0.6 * expected < err < 1.4 * expected
    same = merge(srcs, w, method="dare", rank=10, dare_drop=q, seed=3, space="full", dtype=F64
                 ).lora.modules["m"].delta()
    assert torch.equal(same, runs[3]) and not torch.equal(runs[3], runs[4])
    exact = merge(srcs, w, method="dare", rank=10, dare_drop=0.0, space="full", dtype=F64).lora.modules["m"].delta()
    assert rel(exact, t) < 1e-10


def test_dare_combine_keeps_the_expected_fraction():
    t = torch.ones(400, 500, dtype=F64)
    out = dare_combine([t], 0.9, [torch.Generator().manual_seed(0)])
    kept = float((out != 0).double().mean())
    assert abs(kept - 0.1) < 0.005 and float(out.max()) == pytest.approx(10.0)


def test_dense_methods_chunk_wide_and_tall_modules_alike(monkeypatch):
    import core.merge.ties_dare as cm
    srcs = [lora(1, rank=3, names=[NAMES[0], NAMES[4]]), lora(2, rank=3, names=[NAMES[0], NAMES[4]])]
    results = {}
    for chunk in (5000, 1 << 22):                         # many chunks / one chunk per module
        monkeypatch.setattr(cm, "CHUNK_ELEMENTS", chunk)
        results[chunk] = [merge(srcs, [1, 1], method=m, rank=5, seed=4, space="full", dtype=F64)
                          for m in ("ties", "dare")]
    for small, big in zip(results[5000], results[1 << 22]):   # DARE masks do not depend on chunking
        for name in (NAMES[0], NAMES[4]):
            assert rel(small.lora.modules[name].delta(), big.lora.modules[name].delta()) < 1e-9
            assert torch.isfinite(small.lora.modules[name].delta()).all()


@pytest.mark.parametrize("kind", ["gaussian", "low_rank", "few_values"])
def test_ties_threshold_is_the_exact_quantile(kind):
    g = torch.Generator().manual_seed(0)
    if kind == "gaussian":
        t = torch.randn(700, 900, generator=g, dtype=F64)
    elif kind == "low_rank":                              # what TIES sees: a rank-4 task vector
        t = torch.randn(1100, 4, generator=g, dtype=F64) @ torch.randn(4, 800, generator=g, dtype=F64)
    else:                                                 # heavy ties: the bracket holds many equal values
        t = torch.randint(-3, 4, (800, 700), generator=g).to(F64)
    flat = np.sort(np.abs(t.numpy()).ravel())[::-1]
    for density in (0.001, 0.2, 0.5, 0.97, 1.0):
        keep = max(1, int(math.floor(density * flat.size + 0.5)))
        assert ties_threshold(t, density) == flat[keep - 1]


def test_partial_modules_merged_among_owners_and_single_ones_copied():
    a = lora(1, names=NAMES)
    b = lora(2, names=NAMES[:3])
    c = lora(3, names=NAMES[:2])
    w = [0.5, 0.3, 0.2]
    for method in ("karcher", "linear", "svd"):
        res = merge([a, b, c], w, method=method, dtype=F64)
        status = {m.name: m.status for m in res.report.modules}
        assert status[NAMES[0]] == "merged" and status[NAMES[2]] == "partial" and status[NAMES[4]] == "copied"
        assert rel(res.lora.modules[NAMES[4]].delta(), 0.5 * a.modules[NAMES[4]].delta()) < 1e-12
    assert res.report.summary()["status"] == {"merged": 2, "partial": 1, "copied": 2}


@pytest.mark.parametrize("method", ["linear", "concat", "svd"])
def test_a_source_dead_in_one_module_is_left_out_of_the_exact_sum(method):
    """Two live sources and one dead there (its frames' columns count with weight 0)."""
    srcs = [lora(1, rank=4), lora(2, rank=6), lora(3, rank=2)]
    srcs[2].modules[NAMES[0]].up.zero_()
    w = [0.7, -0.4, 1.5]
    res = merge(srcs, w, method=method, rank=12 if method == "svd" else None)     # svd: full rank, exact
    for name in NAMES:
        assert rel(res.lora.modules[name].delta(), target(srcs, w, name)) < 1e-6
    assert res.report.summary()["rel_error"] < 1e-10


def test_dead_modules_are_skipped_or_left_out_never_nan():
    a, b = lora(1), lora(2)
    a.modules[NAMES[0]].up.zero_()                      # dead in one source: b's own factors, weighted
    a.modules[NAMES[1]].up.zero_()
    b.modules[NAMES[1]].up.zero_()                      # dead in both: skipped
    res = merge([a, b], [0.5, 0.5], method="karcher")
    assert NAMES[1] not in res.lora.modules and res.report.skipped["dead"] == [NAMES[1]]
    assert rel(res.lora.modules[NAMES[0]].delta(), 0.5 * b.modules[NAMES[0]].delta()) < 1e-6
    for m in res.lora.modules.values():
        assert torch.isfinite(m.up).all() and torch.isfinite(m.down).all()
    for m in list(a.modules.values()) + list(b.modules.values()):
        m.up.zero_()
    with pytest.raises(LoraError, match="every module is dead"):
        merge([a, b], method="svd")


def test_cancelling_sum_is_left_out_with_a_warning():
    a = lora(1)
    res = merge([a, a], [1.0, -1.0], method="svd")
    assert not res.lora.modules and len(res.report.skipped["cancelled"]) == len(NAMES)
    assert any("cancel" in w for w in res.report.warnings) and "no module left" in res.report.table()
    with pytest.raises(LoraError, match="no modules"):
        res.save("never-written.safetensors")


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("method", ["karcher", "svd", "ties", "linear"])
def test_progress_counts_modules_and_raising_in_it_aborts(method):
    srcs = [lora(1), related(lora(1), 0.3, 2)]
    calls = []
    merge(srcs, method=method, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, len(NAMES)) for i in range(1, len(NAMES) + 1)]

    class Stop(Exception):
        pass

    def cancel(done, total):
        calls.append(done)
        if done == 2:
            raise Stop
    calls, threads = [], torch.get_num_threads()
    with pytest.raises(Stop):
        merge(srcs, method=method, progress=cancel, threads=1)
    assert calls == [1, 2] and torch.get_num_threads() == threads


def test_bad_input_is_a_clear_error():
    a, b = lora(1), lora(2)
    xl = random_lora("sdxl", rank=4, seed=3, limit=3)
    with pytest.raises(LoraError, match="different base models"):
        merge([a, xl])
    odd = lora(4)
    odd.family = "unknown"
    name = NAMES[2]
    odd.modules[name] = LoraModule(name, torch.randn(320, 4), torch.randn(4, 100))
    with pytest.raises(LoraError, match=name):
        merge([a, odd])
    with pytest.raises(LoraError, match="at most 320"):
        merge([a, b], method="svd", rank=400)
    with pytest.raises(LoraError, match="sources allow"):
        merge([a, b], method="karcher", rank=5)          # rank-4 sources
    with pytest.raises(LoraError, match="negative"):
        merge([a, b], [1.0, -0.5], method="karcher")
    with pytest.raises(LoraError, match="all weights are zero"):
        merge([a, b], [0.0, 0.0], method="linear")
    with pytest.raises(LoraError, match="2 LoRAs"):
        merge([a, b], [1.0])
    with pytest.raises(LoraError, match="exact"):
        merge([a, b], method="linear", rank=4)
    with pytest.raises(LoraError, match="unknown merge method"):
        merge([a, b], method="average")
    with pytest.raises(LoraError, match="density"):
        merge([a, b], method="ties", ties_density=0.0)


def test_zero_weight_leaves_a_source_out_and_rank_caps_per_module():
    a, b = lora(1, rank=4), lora(2, rank=8)
    res = merge([a, b], [1.0, 0.0], method="karcher")
    assert all(m.status == "copied" for m in res.report.modules)
    mixed = lora(3, rank=8)
    mixed.modules[NAMES[2]] = lora(5, rank=2, names=[NAMES[2]]).modules[NAMES[2]]
    res = merge([b, mixed], method="karcher", rank=8)
    assert res.report.capped == [NAMES[2]] and res.lora.modules[NAMES[2]].factor_rank == 2


# ---------------------------------------------------------------- saving
def reconstruct(path):
    """ΔW per module from a kohya file by hand: alpha/rank · up @ down (convs flattened)."""
    out = {}
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        for key in keys:
            if key.endswith(".lora_down.weight"):
                stem = key[: -len(".lora_down.weight")]
                down = f.get_tensor(key).double()
                up = f.get_tensor(stem + ".lora_up.weight").double()
                r = down.shape[0]
                out[stem] = float(f.get_tensor(stem + ".alpha")) / r * (up.reshape(up.shape[0], r) @ down.reshape(r, -1))
    return out, meta, keys


@pytest.mark.parametrize("method", ["karcher", "svd", "linear"])
def test_saved_merge_reloads_with_identical_delta_and_metadata(tmp_path, method):
    paths = []
    for seed in (1, 2):
        paths.append(str(tmp_path / f"src{seed}.safetensors"))
        save_kohya(lora(seed), paths[-1])
    srcs = [lora(1, path=paths[0]), lora(2, path=paths[1])]
    res = merge(srcs, [0.6, 0.4], method=method, rank=None if method == "linear" else 3)
    out = res.save(str(tmp_path / "merged.safetensors"))
    deltas, meta, _ = reconstruct(out)
    assert set(deltas) == set(res.lora.modules)
    for name, d in deltas.items():
        assert rel(d, res.lora.modules[name].delta()) < 1e-12
        assert res.lora.modules[name].weight_shape == srcs[0].modules[name].weight_shape
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert "modelspec.architecture" in meta
    recipe = json.loads(meta[RECIPE_KEY])
    assert recipe["method"] == method and recipe["weights"] == [0.6, 0.4]
    import hashlib
    assert recipe["sources"][0]["sha256"] == hashlib.sha256(open(paths[0], "rb").read()).hexdigest()
    assert recipe["fidelity"]["rel_error"] == pytest.approx(res.report.summary()["rel_error"])
    with pytest.raises(LoraError, match="exists"):
        res.save(out)
    res.save(out, dtype=torch.float16, overwrite=True)
    with safe_open(out, "pt") as f:
        assert f.get_tensor(f"{NAMES[0]}.lora_up.weight").dtype == torch.float16
    json.dumps(res.report.to_dict())                    # JSON-able


def test_saved_merge_reloads_through_core_formats_and_keeps_first_naming(tmp_path):
    formats = pytest.importorskip("core.formats")
    from core.save import atomic_save, kohya_tensors
    xl = random_lora("sdxl", rank=4, seed=1, limit=4)
    arch_alias = {}
    from core.sdarch import arch_for
    aliases = arch_for("sdxl").aliases
    for name in xl.modules:    # spell keys the diffusers way, which kohya files for SDXL also use
        alt = [k for k, v in aliases.items() if v == name and k.startswith("down_blocks_")]
        arch_alias[name] = "lora_unet_" + alt[0] if alt else name
    tensors = {f"{arch_alias[k.split('.', 1)[0]]}.{k.split('.', 1)[1]}": t for k, t in kohya_tensors(xl).items()}
    p1 = atomic_save(tensors, str(tmp_path / "a.safetensors"), {"ss_base_model_version": "sdxl_base_v1-0"})
    p2 = save_kohya(random_lora("sdxl", rank=4, seed=2, limit=4), str(tmp_path / "b.safetensors"))
    a, b = formats.load_lora(p1), formats.load_lora(p2)
    res = merge([a, b], [0.5, 0.5], method="karcher")
    first = res.save(str(tmp_path / "first.safetensors"))
    kohya = merge([a, b], [0.5, 0.5], method="karcher", naming="kohya").save(str(tmp_path / "kohya.safetensors"))
    _, _, keys = reconstruct(first)
    assert {k.split(".", 1)[0] for k in keys} == {arch_alias[n] for n in res.lora.modules}
    _, _, keys = reconstruct(kohya)
    assert {k.split(".", 1)[0] for k in keys} == set(res.lora.modules)
    for path in (first, kohya):
        back = formats.load_lora(path)
        assert back.family == "sdxl"
        for name, m in res.lora.modules.items():
            assert rel(back.modules[name].delta(), m.delta()) < 1e-12


def test_real_sd15_and_sd2_files_merge_every_way(real_loras_dir):
    formats = pytest.importorskip("core.formats")
    sd15 = [formats.load_lora(str(real_loras_dir / f)) for f in
            ("catundchat__pytorch_lora_weights.safetensors", "cloneofsimo__analog_svd_rank4_sd15.safetensors")]
    few = [LoraFile(l.path, l.format, l.family, dict(list(l.modules.items())[:12])) for l in sd15]
    for method in ("karcher", "linear", "svd", "ties", "dare"):
        # ties/dare are dense (checked on synthetic modules above): a few real modules suffice
        res = merge(sd15 if method in ("karcher", "linear", "svd") else few, [0.5, 0.5], method=method,
                    max_iter=10)
        assert res.lora.modules and all(torch.isfinite(m.up).all() and torch.isfinite(m.down).all()
                                        for m in res.lora.modules.values())
        s = res.report.summary()
        assert s["rel_error"] is not None and 0 <= s["rel_error"] < 1.0
        if method == "linear":
            assert s["rel_error"] < 1e-10
    sd2 = [formats.load_lora(str(real_loras_dir / f)) for f in
           ("cloneofsimo__lora_illust_sd2.pt", "cloneofsimo__lora_pop_sd2.pt")]
    res = merge(sd2, [1.0, 1.0], method="svd")
    assert len(res.report.skipped["dead"]) == 32       # to_out.0 is dead in both files


# ---------------------------------------------------------------- command line
def test_cli_merge_writes_lora_and_report(tmp_path, capsys):
    pytest.importorskip("core.formats")
    from core.cli import main
    paths = [save_kohya(lora(s), str(tmp_path / f"s{s}.safetensors")) for s in (1, 2, 3)]
    out, rep = str(tmp_path / "m.safetensors"), str(tmp_path / "m.json")
    code = main(["merge", *paths, "--method", "svd", "--weights", "0.5", "0.3", "0.2", "--rank", "3",
                 "--dtype", "fp32", "-o", out, "--report", rep])
    text = capsys.readouterr().out
    assert code == 0 and "rel.err" in text and "wrote" in text
    report = json.load(open(rep))
    assert report["method"] == "svd" and report["weights"] == [0.5, 0.3, 0.2] and len(report["modules"]) == 5
    deltas, meta, _ = reconstruct(out)
    srcs = [lora(s) for s in (1, 2, 3)]
    for name, d in deltas.items():
        t = target(srcs, [0.5, 0.3, 0.2], name)
        u, s, vh = torch.linalg.svd(t, full_matrices=False)
        assert rel(d, (u[:, :3] * s[:3]) @ vh[:3]) < 1e-5
    assert json.loads(meta[RECIPE_KEY])["rank"] == 3
    # existing output, wrong weight count: one-line errors, exit 2
    assert main(["merge", *paths[:2], "-o", out]) == 2
    assert main(["merge", *paths, "--weights", "1", "1", "-o", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
    assert main(["merge", *paths[:2], "-o", out, "--overwrite", "--method", "karcher"]) == 0
