"""The Karcher mean against independent references: scipy.linalg.subspace_angles,
a brute-force scipy.optimize minimisation of Σ w_k d_geo² over a chart of
Gr(p, d), a long plain gradient descent in numpy, a dense Hessian from
second differences of the cost, and the real SD1.5 files."""
import math

import numpy as np
import pytest
import torch
from scipy.linalg import subspace_angles
from scipy.optimize import minimize

from core.errors import LoraError
import core.karcher as karcher_module
from core.karcher import karcher_mean
from core.means import consensus_rank, flag_mean

from tests.subspace_reference import F64, angles, d_geo, max_angle, near, orth



pytestmark = pytest.mark.usefixtures("one_thread")   # dense references on one thread too


# ---------------------------------------------------------------- two sources
@pytest.mark.parametrize("w1,w2,eps", [(1.0, 1.0, 0.4), (0.2, 0.6, 0.4), (3.0, 1.0, 1e-6), (1.0, 2.0, 0.9)])
def test_two_sources_mean_on_geodesic_at_weight_fraction(w1, w2, eps):
    u1 = orth(25, 4, seed=7)
    u2 = near(u1, eps, 1, seed=8)[0]
    res = karcher_mean(torch.stack([u1, u2]), [w1, w2])
    t = w2 / (w1 + w2)
    dist = d_geo(u1, u2)
    assert abs(d_geo(res.mean, u1) - t * dist) < 1e-6 * max(dist, 1e-3)
    assert abs(d_geo(res.mean, u2) - (1 - t) * dist) < 1e-6 * max(dist, 1e-3)
    assert float(res.grad_norm) < 1e-6 and int(res.iterations) == 0


def test_two_source_closed_form_is_the_stationary_point_of_the_iteration():
    u = near(orth(18, 3, seed=9), 0.3, 2, seed=10)
    closed = karcher_mean(u, [1.0, 3.0]).mean
    # a third source with a vanishing weight leaves the minimiser unchanged up to O(weight)
    third = torch.cat([u, orth(1, 18, 3, seed=11)])
    iterative = karcher_mean(third, [1.0, 3.0, 1e-9], tol=1e-12, max_iter=200)
    assert bool(iterative.converged)
    assert max_angle(closed, iterative.mean) < 1e-6


# ---------------------------------------------------------------- K sources
def brute_force_frechet(bases, w, start):
    """argmin Σ w_k ‖θ(X, U_k)‖² over the chart X(B) = orth(X0 + X0⊥B), by BFGS
    on scipy's principal angles (nothing from core)."""
    x0 = np.asarray(start)
    d, p = x0.shape
    perp = np.linalg.svd(np.eye(d) - x0 @ x0.T)[0][:, : d - p]
    us = [np.asarray(b) for b in bases]

    def point(b):
        return np.linalg.qr(x0 + perp @ b.reshape(d - p, p))[0]

    def cost(b):
        x = point(b)
        return sum(wk * float(np.sum(subspace_angles(x, u) ** 2)) for wk, u in zip(w, us))

    res = minimize(cost, np.zeros((d - p) * p), method="BFGS", jac="3-point",
                   options={"gtol": 1e-11, "maxiter": 2000})
    return point(res.x)


@pytest.mark.parametrize("d,p,k,eps,seed", [(7, 2, 3, 0.2, 0), (8, 3, 4, 0.12, 1), (6, 2, 5, 0.15, 2)])
def test_karcher_matches_brute_force_frechet_mean(d, p, k, eps, seed):
    bases = near(orth(d, p, seed=seed), eps, k, seed=seed + 100)
    w = torch.rand(k, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.2
    res = karcher_mean(bases, w)
    assert bool(res.converged) and float(res.grad_norm) < 1e-6 and bool(res.unique)
    ref = brute_force_frechet(bases, w.numpy(), flag_mean(bases, w).mean)
    assert max_angle(res.mean, ref) < 1e-5


def test_karcher_independent_of_order_basis_and_weight_scale():
    bases = near(orth(60, 5, seed=3), 0.05, 4, seed=4)
    w = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=F64)
    ref = karcher_mean(bases, w).mean
    perm = torch.tensor([2, 0, 3, 1])
    assert max_angle(karcher_mean(bases[perm], w[perm]).mean, ref) < 1e-9
    rot = torch.stack([orth(5, 5, seed=20 + i) for i in range(4)])
    assert max_angle(karcher_mean(bases @ rot, w).mean, ref) < 1e-9
    assert max_angle(karcher_mean(bases, 7.0 * w).mean, ref) < 1e-9


def test_batched_means_equal_one_at_a_time():
    bases = torch.stack([near(orth(40, 4, seed=s), 0.2, 3, seed=50 + s) for s in range(4)])
    w = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0], [0.1, 5.0, 1.0], [2.0, 1.0, 1.0]], dtype=F64)
    batch = karcher_mean(bases, w)
    for i in range(4):
        one = karcher_mean(bases[i], w[i])
        assert max_angle(batch.mean[i], one.mean) < 1e-9
        assert int(batch.iterations[i]) == int(one.iterations)



def test_batch_mixing_near_and_unrelated_sources_equals_one_at_a_time():
    # elements whose truncated CG stops at different inner steps (residual, boundary,
    # negative curvature) and whose outer iterations end at different steps
    near_set = torch.stack([near(orth(12, 3, seed=7), 0.1, 3, seed=70)])
    far = [torch.stack([orth(12, 3, seed=200 + 10 * b + i) for i in range(3)]) for b in range(3)]
    bases = torch.cat([near_set, torch.stack(far)])
    w = torch.tensor([[1.0, 2.0, 1.0], [1.0, 1.0, 1.0], [0.5, 1.0, 2.0], [2.0, 1.0, 1.0]], dtype=F64)
    batch = karcher_mean(bases, w)
    assert len(set(batch.iterations.tolist())) > 1
    for i in range(len(bases)):
        one = karcher_mean(bases[i], w[i])
        assert max_angle(batch.mean[i], one.mean) < 1e-9
        assert int(batch.iterations[i]) == int(one.iterations)
        assert int(batch.hess_products[i]) == int(one.hess_products)

def test_gradient_at_mean_vanishes_by_independent_log_sum():
    """Σ w_k Log_M(U_k) recomputed with the textbook inverse formula (fine away
    from π/2): Log = U·atan(Σ)·Vᵀ with UΣVᵀ = (I − MMᵀ)U_k(MᵀU_k)⁻¹."""
    bases = near(orth(30, 3, seed=12), 0.3, 5, seed=13)
    w = np.array([1.0, 0.5, 2.0, 1.0, 0.7])
    w = w / w.sum()                     # the tolerance is on the gradient of the normalised cost
    m = karcher_mean(bases, torch.tensor(w), tol=1e-9).mean.numpy()
    grad = np.zeros_like(m)
    for wk, u in zip(w, bases.numpy()):
        t = (u - m @ (m.T @ u)) @ np.linalg.inv(m.T @ u)
        a, s, bt = np.linalg.svd(t, full_matrices=False)
        grad += wk * (a * np.arctan(s)) @ bt
    assert np.linalg.norm(grad) < 1e-8


def test_far_sources_flagged_not_unique_but_finite_orthonormal_and_deterministic():
    bases = torch.stack([orth(50, 6, seed=30 + i) for i in range(4)])   # nearly orthogonal
    res = karcher_mean(bases, [1.0, 1.0, 1.0, 1.0])
    again = karcher_mean(bases, [1.0, 1.0, 1.0, 1.0])
    m = res.mean
    assert bool(res.converged) and float(res.grad_norm) <= 1e-8
    assert torch.isfinite(m).all()
    assert torch.allclose(m.T @ m, torch.eye(6, dtype=F64), atol=1e-12)
    assert not bool(res.unique) and not bool(res.afsari)
    assert float(res.max_angle) > math.pi / 4 and float(res.pairwise_max_angle) > math.pi / 4
    assert torch.equal(m, again.mean)
    # spread figures agree with scipy
    worst = max(max_angle(m, b) for b in bases)
    assert abs(float(res.max_angle) - worst) < 1e-9


def test_exactly_orthogonal_pair_gives_finite_orthonormal_midpoint():
    e = torch.eye(8, dtype=F64)
    res = karcher_mean(torch.stack([e[:, :2], e[:, 2:4]]), [1.0, 1.0])
    m = res.mean
    assert torch.isfinite(m).all() and torch.allclose(m.T @ m, torch.eye(2, dtype=F64), atol=1e-12)
    assert np.allclose(angles(m, e[:, :2]), math.pi / 4, atol=1e-9)
    assert not bool(res.unique)


def test_spread_is_within_ball_for_close_sources():
    res = karcher_mean(near(orth(40, 3, seed=14), 0.05, 4, seed=15), [1, 1, 1, 1])
    assert bool(res.unique) and bool(res.afsari) and float(res.radius) < math.pi / 4


def test_chordal_mean_is_extrinsic_mean_and_minimises_chordal_cost():
    bases = near(orth(10, 2, seed=16), 0.5, 3, seed=17)
    w = torch.tensor([1.0, 2.0, 0.5], dtype=F64)
    res = karcher_mean(bases, w, distance="chordal")
    assert max_angle(res.mean, flag_mean(bases, w).mean) < 1e-12
    assert float(res.grad_norm) < 1e-10 and bool(res.unique)

    def chordal_cost(x):
        return sum(float(wk) * float(np.sum(np.sin(subspace_angles(x, np.asarray(b))) ** 2))
                   for wk, b in zip(w, bases))
    best = chordal_cost(np.asarray(res.mean))
    for s in range(20):   # random nearby competitors never do better
        x = torch.linalg.qr(res.mean + 0.05 * torch.randn(10, 2, generator=torch.Generator().manual_seed(s),
                                                            dtype=F64))[0]
        assert chordal_cost(np.asarray(x)) >= best - 1e-12


@pytest.mark.parametrize("weights", [[1.0, -1.0], [1.0, 0.0], [float("nan"), 1.0]])
def test_non_positive_or_bad_weights_are_a_clear_error(weights):
    bases = torch.stack([orth(10, 2, seed=1), orth(10, 2, seed=2)])
    with pytest.raises(LoraError, match="weight"):
        karcher_mean(bases, weights)


def test_unknown_distance_is_a_clear_error():
    with pytest.raises(LoraError, match="supported"):
        karcher_mean(torch.stack([orth(10, 2, seed=1)] * 2), [1, 1], distance="martin")


# ---------------------------------------------------------------- any spread: converged, certified
def cost(x, bases, w):
    """½Σ w_k d_geo²(X, U_k) from scipy's principal angles."""
    return 0.5 * sum(float(wk) * float(np.sum(angles(x, u) ** 2)) for wk, u in zip(w, bases))


def plain_descent(bases, w, start, iters):
    """X ← Exp_X(Σ w_k Log_X U_k) in numpy (textbook SVD formulas), the independent minimiser."""
    x = np.asarray(start)
    us = [np.asarray(u) for u in bases]
    w = np.asarray(w) / np.sum(w)
    for _ in range(iters):
        h = np.zeros_like(x)
        for wk, u in zip(w, us):
            a, c, bt = np.linalg.svd(x.T @ u)
            resid = u @ bt.T - x @ a * c
            s = np.linalg.norm(resid, axis=0)
            theta = np.arctan2(s, c)
            h += wk * (resid * np.where(s > 0, theta / np.where(s > 0, s, 1), 1)) @ a.T
        uu, ss, vt = np.linalg.svd(h, full_matrices=False)
        x = np.linalg.qr(x @ vt.T * np.cos(ss) @ vt + uu * np.sin(ss) @ vt)[0]
    return x


@pytest.mark.parametrize("d,p,k,seed,scipy", [(6, 2, 3, 0, True), (8, 2, 4, 1, False), (9, 3, 3, 2, False)])
def test_unrelated_sources_converge_to_a_point_no_worse_than_independent_minimisers(d, p, k, seed, scipy):
    bases = torch.stack([orth(d, p, seed=100 * seed + i) for i in range(k)])
    w = torch.rand(k, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.3
    res = karcher_mean(bases, w)
    assert bool(res.converged) and float(res.grad_norm) <= 1e-8
    start = flag_mean(bases, w).mean
    if scipy:
        ref = brute_force_frechet(bases, w.numpy(), start)
        assert cost(res.mean, bases, w) <= cost(ref, bases, w) + 1e-10
    gd = plain_descent(bases, w.numpy(), start, 500)
    assert cost(res.mean, bases, w) <= cost(gd, bases, w) + 1e-10


def second_difference_hessian(x, bases, w, h=1e-4):
    """Hessian of the scipy cost in the chart B ↦ orth(X + X⊥B) at B = 0 (equal to the
    Riemannian Hessian at a critical point), by second differences."""
    x = np.asarray(x)
    d, p = x.shape
    perp = np.linalg.svd(np.eye(d) - x @ x.T)[0][:, : d - p]
    n = (d - p) * p

    def f(b):
        return cost(np.linalg.qr(x + perp @ b.reshape(d - p, p))[0], bases, w)
    eye = np.eye(n) * h
    f0 = f(np.zeros(n))
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(i, n):
            out[i, j] = out[j, i] = (f(eye[i] + eye[j]) - f(eye[i] - eye[j]) - f(eye[j] - eye[i])
                                     + f(-eye[i] - eye[j])) / (4 * h * h)
    del f0
    return out / float(np.sum(w))


def test_planted_cut_locus_sources_converge_report_non_unique_and_a_checked_local_minimum():
    # three sources in Gr(2, 8) at principal angles of 80–90° from each other
    e = torch.eye(8, dtype=F64)
    g = torch.Generator().manual_seed(3)
    blocks = [e[:, 0:2], e[:, 2:4], e[:, 4:6]]
    bases = torch.stack([torch.linalg.qr(b + 0.03 * torch.randn(8, 2, generator=g, dtype=F64))[0] for b in blocks])
    pair = [angles(bases[i], bases[j]) for i in range(3) for j in range(i + 1, 3)]
    assert min(a.min() for a in pair) > math.radians(80)
    w = torch.tensor([1.0, 1.5, 2.0], dtype=F64)
    res = karcher_mean(bases, w)
    m = res.mean
    assert bool(res.converged) and float(res.grad_norm) <= 1e-8
    assert torch.isfinite(m).all() and torch.allclose(m.T @ m, torch.eye(2, dtype=F64), atol=1e-12)
    assert not bool(res.unique) and float(res.pairwise_max_angle) > math.radians(80)
    lam = np.linalg.eigvalsh(second_difference_hessian(m, bases, w.numpy()))
    assert float(res.hessian_lower) <= lam[0] + 1e-5
    assert abs(float(res.hessian_min) - lam[0]) < 1e-4       # Lanczos sees all 12 dimensions here
    assert bool(res.local_min) == bool(lam[0] > 0)


def test_spread_mean_invariant_to_order_and_reparametrised_factors():
    bases = torch.stack([orth(30, 3, seed=40 + i) for i in range(4)])
    w = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=F64)
    ref = karcher_mean(bases, w)
    assert bool(ref.converged) and not bool(ref.unique)
    perm = torch.tensor([3, 1, 0, 2])
    assert max_angle(karcher_mean(bases[perm], w[perm]).mean, ref.mean) < 1e-7
    rot = torch.stack([orth(3, 3, seed=60 + i) for i in range(4)])
    assert max_angle(karcher_mean(bases @ rot, w).mean, ref.mean) < 1e-7


def test_float32_start_reaches_the_float64_start_mean_and_small_gaps_start_in_float64(monkeypatch):
    import core.means as means_module
    used = []
    real = means_module.Gram.top

    def top(self, w, p, dtype=None):
        used.append(dtype)
        return real(self, w, p, dtype)
    monkeypatch.setattr(means_module.Gram, "top", top)
    close = near(orth(80, 6, seed=11), 0.1, 4, seed=12)                # eigen-gap ≈ 1: float32 start
    w = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=F64)
    fast = karcher_mean(close, w)
    assert used == [torch.float32]
    monkeypatch.setattr(karcher_module, "START_GAP", math.inf)           # forces the float64 start
    used.clear()
    slow = karcher_mean(close, w)
    assert used == [torch.float32, None]
    assert bool(fast.converged) and int(fast.iterations) == int(slow.iterations)
    assert max_angle(fast.mean, slow.mean) < 1e-10
    assert float((fast.consensus - slow.consensus).abs().max()) < 1e-6
    monkeypatch.undo()
    monkeypatch.setattr(means_module.Gram, "top", top)
    used.clear()
    spread = torch.stack([orth(400, 3, seed=40 + i) for i in range(4)])  # unrelated: relative gap 0.017
    even = torch.ones(4, dtype=F64)
    res = karcher_mean(spread, even)
    assert used == [torch.float32, None] and bool(res.converged)
    assert float((res.consensus - flag_mean(spread, even).consensus).abs().max()) < 1e-12


def test_consensus_at_one_half_is_taken_in_float64_like_rank_auto():
    # four equal-weight sources sharing e1, two of them e2: eigenvalues 1, ½, ¼, ¼ (gap ¼: a
    # float32 start), rotated so that no entry is exact; the count of eigenvalues > ½ must be
    # the float64 one that rank "auto" takes from flag_mean
    eye = torch.eye(12, dtype=F64)
    rot = orth(12, 12, seed=5)
    bases = torch.stack([rot @ eye[:, [0, j]] for j in (1, 1, 2, 3)])
    even = torch.ones(4, dtype=F64)
    res = karcher_mean(bases, even)
    ref = flag_mean(bases, even).consensus
    assert abs(float(ref[1]) - 0.5) < 1e-12
    assert float((res.consensus - ref).abs().max()) < 1e-12
    assert int(consensus_rank(res.consensus)) == int(consensus_rank(ref))


def test_span_coordinates_give_the_full_space_result(monkeypatch):
    bases = torch.stack([orth(40, 3, seed=70 + i) for i in range(3)])
    w = torch.tensor([1.0, 2.0, 1.5], dtype=F64)
    span = karcher_mean(bases, w, tol=1e-12)
    monkeypatch.setattr(karcher_module, "_span_coordinates", lambda b: (None, b))
    full = karcher_mean(bases, w, tol=1e-12)
    assert bool(span.converged) and bool(full.converged)
    assert max_angle(span.mean, full.mean) < 1e-10


def test_real_files_converge_no_worse_than_plain_descent(real_loras_dir):
    formats = pytest.importorskip("core.formats")
    from core.factored import module_svd
    loras = [formats.load_lora(str(real_loras_dir / f)) for f in
             ("catundchat__pytorch_lora_weights.safetensors", "cloneofsimo__analog_svd_rank4_sd15.safetensors",
              "cloneofsimo__lora_disney_sd15.safetensors")]
    common = [n for n in loras[0].modules if all(n in lora.modules for lora in loras[1:])]
    assert common
    for name in common[:3]:
        svds = [module_svd(lora.modules[name]) for lora in loras]
        p = min(int(s.S.numel()) for s in svds)
        bases = torch.stack([s.U[:, :p] for s in svds])
        w = torch.tensor([1.0, 0.7, 1.3], dtype=F64)
        res = karcher_mean(bases, w)
        assert bool(res.converged) and float(res.grad_norm) <= 1e-8
        gd = plain_descent(bases, w.numpy(), flag_mean(bases, w).mean, 300)
        assert cost(res.mean, bases, w) <= cost(gd, bases, w) + 1e-10


def test_float32_converges_to_its_own_tolerance_with_an_orthonormal_basis():
    bases = torch.stack([orth(30, 3, seed=80 + i) for i in range(3)]).float()
    res = karcher_mean(bases, [1.0, 2.0, 1.0])
    m = res.mean
    assert m.dtype == torch.float32 and bool(res.converged) and float(res.grad_norm) <= 1e-5
    assert torch.allclose(m.T @ m, torch.eye(3), atol=1e-5)
    ref = karcher_mean(bases.double(), [1.0, 2.0, 1.0]).mean
    assert max_angle(m.double(), ref) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the batched GPU path is not exercised")
def test_cuda_batched_mean_equals_the_cpu_loop():
    bases = torch.stack([torch.stack([orth(40, 4, seed=10 * b + k) for k in range(3)]) for b in range(5)])
    w = torch.tensor([1.0, 2.0, 1.5], dtype=F64)
    gpu = karcher_mean(bases.cuda(), w.cuda())
    assert bool(gpu.converged.all())
    for b in range(5):
        assert max_angle(gpu.mean[b].cpu(), karcher_mean(bases[b], w).mean) < 1e-7


def test_pairwise_spread_figures_match_scipy_angles_between_the_sources():
    bases = torch.stack([near(orth(25, 3, seed=90), 0.6, 1, seed=91 + i)[0] for i in range(4)])
    res = karcher_mean(bases, [1.0, 2.0, 1.0, 0.5])
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    assert abs(float(res.pairwise_max_angle) - max(max_angle(bases[i], bases[j]) for i, j in pairs)) < 1e-7
    assert abs(float(res.pairwise_distance) - max(d_geo(bases[i], bases[j]) for i, j in pairs)) < 1e-7
