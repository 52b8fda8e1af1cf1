"""Grassmann Log/Exp and the Hessian of the squared distance, against
independent references: scipy.linalg.subspace_angles and finite differences
of the gradient in a dense orthonormal basis of the tangent space."""
import math

import numpy as np
import pytest
import torch
from scipy.linalg import subspace_angles

from core.grassmann import (SqDistanceHessian, grassmann_exp, grassmann_log, hessian_lower_bound, log_frame,
                            tangent_projection)

from tests.subspace_reference import F64, angles, d_geo, max_angle, near, orth


pytestmark = pytest.mark.usefixtures("one_thread")


def tangent(x, seed, scale):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(x.shape, generator=g, dtype=F64)
    return scale * (h - x @ (x.T @ h))


# ---------------------------------------------------------------- Log / Exp
@pytest.mark.parametrize("d,p,eps", [(12, 3, 0.3), (40, 5, 1e-7), (30, 6, 2.0)])
def test_log_is_tangent_with_geodesic_length_and_exp_inverts_it(d, p, eps):
    x = orth(d, p, seed=1)
    y = near(x, eps, 1, seed=2)[0]
    h = grassmann_log(x, y)
    assert float((x.T @ h).abs().max()) < 1e-12
    ref = d_geo(x, y)
    assert abs(float(torch.linalg.matrix_norm(h)) - ref) <= 1e-9 * ref + 1e-15
    assert max_angle(grassmann_exp(x, h), y) < 1e-9


@pytest.mark.parametrize("scale", [1e-9, 1e-3, 0.2])
def test_log_of_exp_returns_the_tangent_even_for_tiny_steps(scale):
    x = orth(20, 4, seed=3)
    h = tangent(x, seed=4, scale=scale)
    assert float(torch.linalg.matrix_norm(h, ord=2)) < math.pi / 2
    back = grassmann_log(x, grassmann_exp(x, h))
    # a basis holds a point to rounding (≈1e-16 absolute), so that is the floor
    assert float(torch.linalg.matrix_norm(back - h)) < 1e-9 * float(torch.linalg.matrix_norm(h)) + 1e-14


def test_exp_returns_orthonormal_basis_and_batched_equals_loop():
    x = orth(5, 30, 4, seed=5)
    y = orth(5, 30, 4, seed=6)
    logs = grassmann_log(x, y)
    ex = grassmann_exp(x, logs)
    for i in range(5):
        assert torch.allclose(logs[i], grassmann_log(x[i], y[i]), atol=1e-12)
        assert torch.allclose(ex[i].T @ ex[i], torch.eye(4, dtype=F64), atol=1e-12)
        assert max_angle(ex[i], y[i]) < 1e-9


def planted(x, thetas, seed):
    """A subspace at the given principal angles from x (random principal vectors)."""
    d, p = x.shape
    g = torch.Generator().manual_seed(seed)
    rot = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=F64))[0]
    perp = torch.linalg.qr(torch.randn(d, p, generator=g, dtype=F64) - x @ (x.T @ torch.randn(d, p, generator=g, dtype=F64)))[0]
    perp = torch.linalg.qr(perp - x @ (x.T @ perp))[0]
    t = torch.tensor(thetas, dtype=F64)
    return (x @ rot) * torch.cos(t) + perp * torch.sin(t)


@pytest.mark.parametrize("thetas", [[1e-9, 0.1, 0.1, 0.1 + 1e-9, 0.3, 1.4],   # tiny, repeated, near-repeated
                                    [0.2, 0.5, 0.7, 0.9, 1.1, 1.3]])
def test_close_log_frame_equals_the_svd_route(thetas):
    x = orth(40, 6, seed=5)
    ys = torch.stack([planted(x, thetas, seed=6), near(x, 0.2, 1, seed=7)[0]])
    ref = log_frame(x.unsqueeze(0), ys)
    got = log_frame(x.unsqueeze(0), ys, close=True)
    assert torch.allclose(got[1], ref[1], atol=1e-13, rtol=0)                  # angles
    assert torch.allclose(got[1][0], torch.tensor(thetas, dtype=F64), atol=1e-13, rtol=0)
    logs = [(e * t.unsqueeze(-2)) @ p_.transpose(-1, -2) for p_, t, e in (ref, got)]
    assert torch.allclose(logs[1], logs[0], atol=1e-13, rtol=0)                 # the Log maps
    assert torch.allclose(got[0].transpose(-1, -2) @ got[0], torch.eye(6, dtype=F64).expand(2, 6, 6), atol=1e-13)
    hess = [SqDistanceHessian(*frame, torch.tensor([0.3, 0.7], dtype=F64)) for frame in (ref, got)]
    eta = tangent(x, seed=8, scale=1.0)
    assert torch.allclose(hess[1](eta), hess[0](eta), atol=1e-12, rtol=0)


def test_close_log_frame_takes_the_svd_near_a_right_angle():
    x = orth(40, 6, seed=5)
    far = planted(x, [0.1, 0.2, 0.3, 0.4, 0.5, 1.5], seed=9).unsqueeze(0)      # cos 1.5 = 0.07 < CLOSE_MIN_COS
    ref = log_frame(x.unsqueeze(0), far)
    got = log_frame(x.unsqueeze(0), far, close=True)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


# ---------------------------------------------------------------- Hessian of ½Σ w_k d²
def dense_hessians(x, ys, w):
    """(ours, reference) as matrices in an orthonormal basis of the tangent space at x;
    the reference by central differences of the gradient −Σ w_k Log_X(Y_k), moved back
    by projection (the Levi-Civita connection of Gr)."""
    d, p = x.shape
    perp = torch.linalg.svd(torch.eye(d, dtype=F64) - x @ x.T)[0][:, : d - p]
    p_, theta, e = log_frame(x.unsqueeze(0), ys)
    hess = SqDistanceHessian(p_, theta, e, w)

    def grad(z):
        return -sum(wk * grassmann_log(z, y) for wk, y in zip(w, ys))
    n = (d - p) * p
    ours, ref = np.zeros((n, n)), np.zeros((n, n))
    t = 1e-5
    for i in range(n):
        b = torch.zeros(n, dtype=F64)
        b[i] = 1
        eta = perp @ b.reshape(d - p, p)
        ours[:, i] = (perp.T @ hess(eta)).reshape(-1).numpy()
        fd = (tangent_projection(x, grad(grassmann_exp(x, t * eta)))
              - tangent_projection(x, grad(grassmann_exp(x, -t * eta)))) / (2 * t)
        ref[:, i] = (perp.T @ fd).reshape(-1).numpy()
    return ours, ref, hess


@pytest.mark.parametrize("d,p,k,eps,seed", [(7, 2, 1, 0.5, 0), (12, 3, 3, 0.3, 1), (9, 2, 4, 3.0, 2),
                                            (16, 3, 5, 3.0, 3), (9, 4, 2, 3.0, 4)])
def test_hessian_equals_finite_differences_of_the_gradient(d, p, k, eps, seed):
    base = orth(d, p, seed=seed)
    ys = near(base, eps, k, seed=seed + 10)
    w = torch.rand(k, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.2
    ours, ref, hess = dense_hessians(base, ys, w)
    assert np.linalg.norm(ours - ref) <= 1e-8 * np.linalg.norm(ref)
    assert np.allclose(ours, ours.T, atol=1e-12)
    lam = np.linalg.eigvalsh(ours)[0]
    assert float(hess.lower_bound()) <= lam + 1e-12      # Weyl bound is a bound


@pytest.mark.parametrize("d,p,eps,seed", [(7, 1, 0.8, 0), (9, 3, 0.4, 1), (10, 2, 3.0, 2), (12, 4, 3.0, 3)])
def test_lower_bound_is_the_least_eigenvalue_for_one_source(d, p, eps, seed):
    """With one source (d ≥ 2p every root has its eigenvector) the Weyl bound is exact: the
    least eigenvalue of the dense Hessian, from the two largest angles alone."""
    ys = near(orth(d, p, seed=seed), eps, 1, seed=seed + 20)
    x = orth(d, p, seed=seed + 40)
    ours, ref, hess = dense_hessians(x, ys, torch.ones(1, dtype=F64))
    lam = np.linalg.eigvalsh(ref)[0]
    theta = log_frame(x.unsqueeze(0), ys)[1]
    assert abs(float(hessian_lower_bound(theta, torch.ones(1, dtype=F64))) - lam) <= 1e-6 * max(1.0, abs(lam))
    assert float(hess.lower_bound()) == float(hessian_lower_bound(theta, torch.ones(1, dtype=F64)))


def test_hessian_near_the_cut_locus_stays_finite():
    e = torch.eye(10, dtype=F64)
    x = e[:, :2]
    y = torch.linalg.qr(torch.stack([e[:, 2] + 1e-9 * e[:, 0], e[:, 3] + 1e-9 * e[:, 1]], 1))[0]
    p_, theta, frame_e = log_frame(x.unsqueeze(0), y.unsqueeze(0))
    out = SqDistanceHessian(p_, theta, frame_e, torch.ones(1, dtype=F64))(tangent(x, 1, 1.0))
    assert torch.isfinite(out).all()
