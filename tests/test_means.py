"""Flag mean, flag median and consensus rank against dense references: the
eigendecomposition of the d×d matrix Σ w_k U_kU_kᵀ and a dense IRLS loop in numpy."""
import math

import numpy as np
import pytest
import torch

from core.errors import LoraError
from core.means import consensus_rank, flag_mean, flag_median

from tests.subspace_reference import F64, max_angle, orth


pytestmark = pytest.mark.usefixtures("one_thread")


def dense_projector_sum(bases, w):
    w = np.asarray(w, dtype=float) / np.sum(w)
    return sum(wk * np.asarray(b) @ np.asarray(b).T for wk, b in zip(w, bases))


def test_flag_mean_of_mixed_ranks_is_top_eigenspace_of_weighted_projector_sum():
    bases = [orth(15, 3, seed=1), orth(15, 5, seed=2), orth(15, 2, seed=3), orth(15, 4, seed=4)]
    w = [0.5, 2.0, 1.0, 0.25]
    lam, vec = np.linalg.eigh(dense_projector_sum(bases, w))
    for p in (2, 3, 6):
        res = flag_mean(bases, w, p)
        assert max_angle(res.mean, vec[:, -p:]) < 1e-10
        assert torch.allclose(res.mean.T @ res.mean, torch.eye(p, dtype=F64), atol=1e-12)
        assert bool(res.unique)
    # consensus = the nonzero spectrum of Σ w_k U_kU_kᵀ with Σ w = 1
    assert np.allclose(res.consensus.numpy(), lam[::-1][:14], atol=1e-12)
    # the largest angle to a source, from R-sized blocks, = the d-space principal angles
    widest = max(max_angle(res.mean, b) for b in bases)
    assert abs(float(res.max_angle) - widest) < 1e-7


def test_flag_mean_batched_equals_one_at_a_time():
    bases = torch.stack([torch.stack([orth(20, 3, seed=10 * b + k) for k in range(3)]) for b in range(4)])
    w = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0], [0.1, 5.0, 1.0], [2.0, 1.0, 1.0]], dtype=F64)
    batch = flag_mean(bases, w)
    for i in range(4):
        assert max_angle(batch.mean[i], flag_mean(bases[i], w[i]).mean) < 1e-12


def test_rank_beyond_the_sources_span_is_a_clear_error():
    with pytest.raises(LoraError, match="directions"):
        flag_mean([orth(10, 2, seed=1), orth(10, 2, seed=2)], [1, 1], p=5)


def planted(d, shared, private, seed):
    """Three sources: 1 and 2 share `shared` directions, each has `private` of its own;
    source 3 is all private. Equal weights: shared λ = 2/3, private λ = 1/3."""
    q = orth(d, 2 * shared + 4 * private, seed=seed)
    common = q[:, :shared]
    cols = iter(range(shared, q.shape[1]))
    own = lambda n: q[:, [next(cols) for _ in range(n)]]      # noqa: E731
    u1 = torch.cat([common, own(private)], 1)
    u2 = torch.cat([common, own(private)], 1)
    u3 = own(shared + private)
    return [u1, u2, u3], common


@pytest.mark.parametrize("shared,private", [(1, 2), (3, 1), (4, 3)])
def test_consensus_rank_counts_directions_a_majority_shares(shared, private):
    bases, common = planted(40, shared, private, seed=shared)
    res = flag_mean(bases, [1.0, 1.0, 1.0])
    assert int(consensus_rank(res.consensus)) == shared
    assert np.allclose(res.consensus[:shared].numpy(), 2 / 3, atol=1e-12)
    top = flag_mean(bases, [1.0, 1.0, 1.0], shared).mean
    assert max_angle(top, common) < 1e-10
    # with the third source weighted above half, its own directions win instead
    heavy = flag_mean(bases, [1.0, 1.0, 2.5])
    assert int(consensus_rank(heavy.consensus)) == shared + private


def test_consensus_rank_is_the_best_projector_of_any_rank():
    """argmin over projectors P of Σ w_k‖P − U_kU_kᵀ‖²_F, brute force over the eigen-subsets."""
    bases = [orth(8, 2, seed=21), orth(8, 3, seed=22), orth(8, 2, seed=23)]
    w = np.array([0.5, 0.3, 0.2])
    m = dense_projector_sum(bases, w)
    lam, vec = np.linalg.eigh(m)
    best = min(range(9), key=lambda r: sum(wk * np.linalg.norm(vec[:, 8 - r:] @ vec[:, 8 - r:].T
                                                                - np.asarray(b) @ np.asarray(b).T) ** 2
                                           for wk, b in zip(w, bases)))
    assert int(consensus_rank(flag_mean(bases, w).consensus)) == best


def dense_flag_median(bases, w, p, iters=500, eps=1e-10):
    """IRLS of Mankovich et al. 2022 with d×d projectors in numpy."""
    w = np.asarray(w, dtype=float)
    us = [np.asarray(b) for b in bases]
    x = np.linalg.eigh(dense_projector_sum(us, w))[1][:, -p:]
    for _ in range(iters):
        dist = np.array([math.sqrt(max(min(p, u.shape[1]) - np.linalg.norm(x.T @ u) ** 2, 0)) for u in us])
        a = w / np.maximum(dist, eps)
        x = np.linalg.eigh(dense_projector_sum(us, a))[1][:, -p:]
    return x


def test_flag_median_matches_dense_irls_and_lowers_the_sum_of_distances():
    bases = [orth(12, 2, seed=31), orth(12, 3, seed=32), orth(12, 2, seed=33), orth(12, 2, seed=34)]
    w = [1.0, 0.5, 2.0, 1.0]
    res = flag_median(bases, w, 2, tol=1e-14, max_iter=500)
    ref = dense_flag_median(bases, w, 2)
    assert max_angle(res.mean, ref) < 1e-6

    def objective(x):
        return sum(wk * math.sqrt(max(min(2, u.shape[1]) - float(np.linalg.norm(np.asarray(x).T @ np.asarray(u)) ** 2), 0))
                   for wk, u in zip(w, bases))
    assert objective(res.mean) <= objective(flag_mean(bases, w, 2).mean) + 1e-12
    # the median sits on a source here, where √(p − Σcos²) only has √ε ≈ 1e-8 of precision
    assert abs(float(res.objective) * sum(w) - objective(res.mean)) < 1e-7


def test_flag_median_is_robust_to_an_outlier():
    base = orth(30, 3, seed=40)
    g = torch.Generator().manual_seed(41)
    inliers = [torch.linalg.qr(base + 0.05 * torch.randn(30, 3, generator=g, dtype=F64))[0] for _ in range(4)]
    outlier = orth(30, 3, seed=42)
    bases = inliers + [outlier]
    w = [1.0] * 5
    mean = flag_mean(bases, w).mean
    median = flag_median(bases, w)
    assert bool(median.converged)
    clean = flag_mean(inliers, [1.0] * 4).mean
    assert max_angle(median.mean, clean) < 0.5 * max_angle(mean, clean)
    assert max_angle(median.mean, base) < max_angle(mean, base)


def test_refine_top_certifies_the_top_space_of_a_nearby_matrix_and_declines_without_a_gap():
    """From the eigenvectors of A₀, the top-p space of a nearby A within REFINE_TOL of eigh's;
    None where λ_p = λ_{p+1} (nothing to certify)."""
    from core.means import REFINE_TOL, refine_top
    q = orth(96, 96, seed=90)
    lam0 = torch.linspace(1.0, 0.01, 96, dtype=F64)
    a0 = (q * lam0) @ q.T
    g = torch.Generator().manual_seed(91)
    e = torch.randn(96, 96, generator=g, dtype=F64) * 1e-6                 # ‖A − A₀‖₂ ≈ 2e-5 ≤ slack
    a = a0 + e + e.T
    lam, vec = torch.linalg.eigh(a)
    p = 20
    got = refine_top(a, q[:, :p].contiguous(), q[:, p:].contiguous(), lam0[p:], torch.full((1,), 1e-4, dtype=F64))
    assert got is not None
    mu, x = got
    ref = vec.flip(-1)[:, :p]
    assert float(torch.linalg.matrix_norm(x - ref @ (ref.T @ x), ord=2)) < REFINE_TOL
    assert torch.allclose(mu, lam.flip(-1)[:p], atol=1e-12)
    assert torch.allclose(x.T @ x, torch.eye(p, dtype=F64), atol=1e-12)
    tied = lam0.clone()
    tied[p - 1] = tied[p]
    at = (q * tied) @ q.T
    assert refine_top(at, q[:, :p].contiguous(), q[:, p:].contiguous(), tied[p:], torch.zeros(1, dtype=F64)) is None


def test_flag_median_warm_steps_equal_eigh_steps(monkeypatch):
    """R = 4·32 ≥ REFINE_MIN_R: IRLS steps refined from the previous step's eigenvectors give
    the median, its steps and objective of a float64 eigh at every step."""
    import core.means as means_module
    d, p = 150, 32
    base = orth(d, p, seed=95)
    g = torch.Generator().manual_seed(96)
    bases = [torch.linalg.qr(base + 0.3 * torch.randn(d, p, generator=g, dtype=F64))[0] for _ in range(3)]
    bases.append(orth(d, p, seed=97))                                    # an outlier
    w = [1.0, 1.0, 1.0, 1.0]
    tried = []
    real = means_module.refine_top
    monkeypatch.setattr(means_module, "refine_top", lambda *a: tried.append(real(*a)) or tried[-1])
    warm = flag_median(bases, w, p)
    assert sum(t is not None for t in tried) >= 3                       # the warm route answered
    monkeypatch.setattr(means_module, "REFINE_MIN_R", 10 ** 6)
    cold = flag_median(bases, w, p)
    assert int(warm.iterations) == int(cold.iterations) and bool(warm.converged)
    assert max_angle(warm.mean, cold.mean) < 1e-9
    assert abs(float(warm.objective) - float(cold.objective)) < 1e-12


def test_a_direction_held_by_exactly_half_the_weight_is_a_tie_whatever_the_rounding():
    # four equal-weight sources sharing e1, two of them e2: λ = 1, ½, ¼, ¼. Rotated at random,
    # the computed ½ lands on either side of ½ by ~1e-16 (eigh and eigvalsh even disagree):
    # the count must not follow the rounding
    eye = torch.eye(12, dtype=F64)
    sides = set()
    for seed in range(24):
        rot = orth(12, 12, seed=100 + seed)
        bases = [rot @ eye[:, [0, j]] for j in (1, 1, 2, 3)]
        lam = flag_mean(bases, [1.0] * 4).consensus
        assert abs(float(lam[1]) - 0.5) < 1e-12
        sides.add(float(lam[1]) > 0.5)
        assert int(consensus_rank(lam)) == 1
    assert sides == {True, False}     # the rounding did go both ways: the margin is what decides
