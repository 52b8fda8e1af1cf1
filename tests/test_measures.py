import math

import numpy as np
import pytest
import scipy.linalg
import torch

from core.factored import svd_from_factors
from core.grassmann import principal_angles
from core.measures import (DISTANCES, METRICS, chance_grid, chance_phi, cross_rank_geodesic, distance,
                           distances, log_cos, lora_chordal, lora_phi, phi, phi_from_cosines, phi_grid,
                           span_chordal, span_phi, subspace_distances)


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: single-threaded torch


def orthonormal(d, k, gen, dtype=torch.float64):
    return torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=dtype))[0]


def near(x, eps, gen):
    return torch.linalg.qr(x + eps * torch.randn(x.shape, generator=gen, dtype=x.dtype))[0]


def scipy_angles(x, y):
    return np.sort(scipy.linalg.subspace_angles(x.numpy(), y.numpy()))


def with_angles(theta, d):
    """Bases X = [e_1..e_k], Y = [cos θ_i e_i + sin θ_i e_{k+i}] with known principal angles."""
    k = len(theta)
    x = torch.zeros(d, k, dtype=torch.float64)
    y = torch.zeros(d, k, dtype=torch.float64)
    for i, t in enumerate(theta):
        x[i, i] = 1.0
        y[i, i] = math.cos(t)
        y[k + i, i] = math.sin(t)
    return x, y


# ---------------------------------------------------------------- φ
@pytest.mark.parametrize("d,k,l", [(30, 4, 4), (60, 3, 8), (60, 8, 3), (768, 64, 64)])
def test_phi_matches_scipy_angles(d, k, l):
    g = torch.Generator().manual_seed(d + k + l)
    x, y = orthonormal(d, k, g), orthonormal(d, l, g)
    ref = np.sum(np.cos(scipy_angles(x, y)) ** 2) / min(k, l)
    assert abs(float(phi(x, y)) - ref) < 1e-12
    assert abs(float(phi_from_cosines(torch.cos(principal_angles(x, y)))) - ref) < 1e-12


def test_phi_grid_matches_brute_force_and_is_batched():
    g = torch.Generator().manual_seed(1)
    x, y = orthonormal(40, 6, g), orthonormal(40, 9, g)
    grid = phi_grid(x, y)
    assert grid.shape == (6, 9)
    for i in range(1, 7):
        for j in range(1, 10):
            m = x[:, :i].numpy().T @ y[:, :j].numpy()
            assert abs(float(grid[i - 1, j - 1]) - np.sum(m * m) / min(i, j)) < 1e-12
    xs = torch.stack([x, orthonormal(40, 6, g)])
    ys = torch.stack([y, orthonormal(40, 9, g)])
    batched = phi_grid(xs, ys)
    assert torch.allclose(batched[0], grid) and torch.allclose(batched[1], phi_grid(xs[1], ys[1]))
    assert torch.allclose(phi(xs, ys), torch.stack([phi(xs[0], ys[0]), phi(xs[1], ys[1])]))


def test_phi_of_a_subspace_with_itself_and_with_a_rotated_basis_is_one():
    g = torch.Generator().manual_seed(2)
    x = orthonormal(50, 5, g)
    q = orthonormal(5, 5, g)
    assert abs(float(phi(x, x)) - 1) < 1e-12 and abs(float(phi(x, x @ q)) - 1) < 1e-12
    # a subspace contained in a larger one: φ uses min(k, l), so still 1
    assert abs(float(phi(x[:, :2], x)) - 1) < 1e-12


@pytest.mark.parametrize("d,i,j", [(64, 4, 4), (100, 3, 12), (200, 16, 8)])
def test_chance_level_matches_monte_carlo(d, i, j):
    g = torch.Generator().manual_seed(d * i + j)
    n = 600
    xs = torch.linalg.qr(torch.randn(n, d, i, generator=g, dtype=torch.float64))[0]
    ys = torch.linalg.qr(torch.randn(n, d, j, generator=g, dtype=torch.float64))[0]
    samples = phi(xs, ys).numpy()
    se = samples.std(ddof=1) / math.sqrt(n)
    assert abs(samples.mean() - chance_phi(i, j, d)) < 4 * se
    assert chance_grid(i, j, d)[i - 1, j - 1].item() == pytest.approx(chance_phi(i, j, d))
    assert chance_grid(i, j, d)[0, 0].item() == pytest.approx(1 / d)


def test_chance_rejects_nonsense():
    with pytest.raises(ValueError):
        chance_phi(0, 3, 10)
    assert chance_phi(20, 5, 10) == 1.0


# ---------------------------------------------------------------- distances vs brute force
def orthogonal_procrustes_q(x, y):
    # argmin_Q ‖X − YQ‖_F over orthogonal Q (scipy's solver, not our angles)
    return scipy.linalg.orthogonal_procrustes(y, x)[0]


@pytest.mark.parametrize("seed,eps", [(0, None), (1, None), (2, 0.05), (3, 0.3)])
def test_distances_match_brute_force_formulas(seed, eps):
    g = torch.Generator().manual_seed(seed)
    d, k = 12, 4
    x = orthonormal(d, k, g)
    y = orthonormal(d, k, g) if eps is None else near(x, eps, g)
    xn, yn = x.numpy(), y.numpy()
    theta = scipy_angles(x, y)
    det = abs(np.linalg.det(xn.T @ yn))
    q = orthogonal_procrustes_q(xn, yn)
    brute = {
        "geodesic": np.sqrt(np.sum(theta ** 2)),
        "chordal": np.linalg.norm(xn @ xn.T - yn @ yn.T, "fro") / math.sqrt(2),
        "binet_cauchy": math.sqrt(1 - det ** 2),
        "fubini_study": math.acos(det),
        "asimov": theta.max(),
        "martin": math.sqrt(-np.linalg.slogdet((xn.T @ yn) @ (xn.T @ yn).T)[1]),
        "procrustes": np.linalg.norm(xn - yn @ q, "fro"),
        "spectral": np.linalg.norm(xn - yn @ q, 2),
    }
    ours = distances(principal_angles(x, y))
    assert set(ours) == set(DISTANCES)
    for name in DISTANCES:
        assert float(ours[name]) == pytest.approx(brute[name], rel=1e-9, abs=1e-11), name


def test_small_angles_keep_their_digits():
    # Brute-force forms (1 − det², arccos det) lose everything here; the first-order
    # expansions are exact to O(θ³): every distance ≈ its leading term.
    theta = [1e-9, 2e-9, 3e-9]
    x, y = with_angles(theta, 8)
    t = principal_angles(x, y)
    norm = math.sqrt(sum(v * v for v in theta))
    got = distances(t)
    for name in ("geodesic", "chordal", "binet_cauchy", "fubini_study", "martin", "procrustes"):
        assert float(got[name]) == pytest.approx(norm, rel=1e-6), name
    assert float(got["asimov"]) == pytest.approx(3e-9, rel=1e-6)
    assert float(got["spectral"]) == pytest.approx(3e-9, rel=1e-6)
    assert float(log_cos(torch.tensor([1e-9], dtype=torch.float64))) == pytest.approx(-5e-19, rel=1e-6)


def test_products_of_cosines_do_not_underflow():
    g = torch.Generator().manual_seed(4)
    x, y = orthonormal(768, 64, g), orthonormal(768, 64, g)
    theta = principal_angles(x, y)
    assert float(torch.prod(torch.cos(theta).float())) == 0.0          # the pitfall
    logdet = torch.linalg.slogdet(x.T @ y)[1]
    got = distances(theta)
    assert float(got["martin"]) == pytest.approx(math.sqrt(-2 * float(logdet)), rel=1e-10)
    assert math.isfinite(float(got["martin"]))
    # Πcos ≈ 1e-48: Fubini–Study is π/2 minus that, Binet–Cauchy 1 minus its square
    assert float(got["fubini_study"]) == pytest.approx(math.pi / 2 - math.exp(float(logdet)), abs=1e-15)
    assert float(got["binet_cauchy"]) == pytest.approx(1.0, abs=1e-15)
    # float32 angles give the same finite Martin distance (no overflow via 1/cos²)
    assert float(martin_f32 := distance("martin", theta.float())) == pytest.approx(float(got["martin"]),
                                                                                  rel=1e-4)
    assert math.isfinite(martin_f32)


def test_martin_is_infinite_only_at_a_right_angle():
    x, y = with_angles([0.3, math.pi / 2], 6)
    assert math.isinf(float(distance("martin", principal_angles(x, y))))
    x, y = with_angles([0.3, math.pi / 2 - 1e-6], 6)
    m = float(distance("martin", principal_angles(x, y)))
    assert math.isfinite(m)
    ref = math.sqrt(-2 * (math.log(math.cos(0.3)) + math.log(math.sin(1e-6))))
    assert m == pytest.approx(ref, rel=1e-8)


def test_unknown_distance_name():
    with pytest.raises(ValueError):
        distance("projection", torch.zeros(3))


# ---------------------------------------------------------------- metric axioms
def random_triples(n, d, k, gen):
    """n triples on Gr(k, d), stacked: a quarter unrelated, the rest close to
    each other at three scales (where the triangle inequality is tightest)."""
    x = torch.linalg.qr(torch.randn(n, d, k, generator=gen, dtype=torch.float64))[0]
    eps = torch.tensor([10.0, 0.02, 0.3, 1.0], dtype=torch.float64).repeat(n // 4 + 1)[:n, None, None]
    y = torch.linalg.qr(x + eps * torch.randn(x.shape, generator=gen, dtype=torch.float64))[0]
    z = torch.linalg.qr(y + eps * torch.randn(x.shape, generator=gen, dtype=torch.float64))[0]
    return x, y, z


@pytest.mark.parametrize("d,k", [(3, 1), (4, 2), (6, 3), (10, 4), (9, 2)])
def test_true_metrics_satisfy_the_axioms_on_random_triples(d, k):
    g = torch.Generator().manual_seed(5 + d * k)
    x, y, z = random_triples(400, d, k, g)
    q = torch.linalg.qr(torch.randn(400, k, k, generator=g, dtype=torch.float64))[0]
    angles = {"xy": principal_angles(x, y), "yx": principal_angles(y, x), "yz": principal_angles(y, z),
              "xz": principal_angles(x, z), "xx": principal_angles(x, x @ q)}
    for name in METRICS:
        dist = {key: distance(name, t) for key, t in angles.items()}
        assert (dist["xy"] >= 0).all(), name
        assert torch.allclose(dist["xy"], dist["yx"], atol=1e-12), name                # symmetry
        assert (dist["xz"] <= dist["xy"] + dist["yz"] + 1e-10).all(), name             # triangle
        assert (dist["xx"] < 1e-7).all(), name                                         # identity
        assert (dist["xy"] > 1e-9).all(), name                              # distinct points apart


def test_martin_is_not_a_metric():
    # Lines in R² at angles 0, θ, 2θ: Martin(0, 2θ) > Martin(0, θ) + Martin(θ, 2θ).
    assert "martin" not in METRICS
    line = lambda a: torch.tensor([[math.cos(a)], [math.sin(a)]], dtype=torch.float64)
    for t in (0.1, 0.4, 0.7):
        one = float(distance("martin", principal_angles(line(0), line(t))))
        two = float(distance("martin", principal_angles(line(0), line(2 * t))))
        assert two > 2 * one


def test_cross_rank_geodesic_is_a_metric_across_ranks():
    g = torch.Generator().manual_seed(6)
    d = 9
    for t in range(300):
        k, l, m = (t % 4) + 1, ((t // 4) % 4) + 1, ((t // 16) % 4) + 1
        x, y, z = orthonormal(d, k, g), orthonormal(d, l, g), orthonormal(d, m, g)
        if t % 3 == 0:  # nested / close configurations
            y = torch.linalg.qr(torch.cat([x, orthonormal(d, l, g)], 1)[:, :l])[0]

        def dist(a, b):
            return float(cross_rank_geodesic(principal_angles(a, b), a.shape[1], b.shape[1]))
        assert dist(x, y) == pytest.approx(dist(y, x), abs=1e-12)
        assert dist(x, z) <= dist(x, y) + dist(y, z) + 1e-10
        assert dist(x, x) < 1e-7
        if k != l:
            assert dist(x, y) >= math.pi / 2 * math.sqrt(abs(k - l)) - 1e-12


def test_common_dimension_distance_is_zero_for_nested_subspaces():
    # Documented: restricted to min(k, l) angles, a subspace and one containing it are at 0.
    g = torch.Generator().manual_seed(7)
    x = orthonormal(20, 5, g)
    out = subspace_distances(x[:, :2], x)
    assert float(out["geodesic"]) < 1e-7 and float(out["chordal"]) < 1e-7
    assert float(out["geodesic_cross_rank"]) == pytest.approx(math.pi / 2 * math.sqrt(3), abs=1e-7)


# ---------------------------------------------------------------- differentiable versions
def test_span_phi_and_chordal_values_match_svd_bases():
    g = torch.Generator().manual_seed(8)
    up_a, down_a = torch.randn(50, 4, generator=g, dtype=torch.float64), torch.randn(4, 30, generator=g,
                                                                                     dtype=torch.float64)
    up_b, down_b = torch.randn(50, 6, generator=g, dtype=torch.float64), torch.randn(6, 30, generator=g,
                                                                                     dtype=torch.float64)
    sa, sb = svd_from_factors(up_a, down_a), svd_from_factors(up_b, down_b)
    for side, xa, xb in (("out", sa.U, sb.U), ("in", sa.V, sb.V)):
        theta = scipy_angles(xa, xb)
        assert float(lora_phi(up_a, down_a, up_b, down_b, side)) == pytest.approx(
            np.sum(np.cos(theta) ** 2) / 4, abs=1e-12)
        assert float(lora_chordal(up_a, down_a, up_b, down_b, side)) == pytest.approx(
            np.linalg.norm(np.sin(theta)), abs=1e-10)
        assert float(lora_chordal(up_a, down_a, up_b, down_b, side, squared=True)) == pytest.approx(
            np.sum(np.sin(theta) ** 2), abs=1e-12)
    # φ = 1 − chordal²/p (the corrected App. G identity)
    assert float(span_phi(up_a, up_b)) == pytest.approx(1 - float(span_chordal(up_a, up_b)) ** 2 / 4, abs=1e-12)


def test_span_phi_is_invariant_to_reparametrisation():
    g = torch.Generator().manual_seed(9)
    up_a = torch.randn(40, 5, generator=g, dtype=torch.float64)
    up_b = torch.randn(40, 5, generator=g, dtype=torch.float64)
    G = torch.randn(5, 5, generator=g, dtype=torch.float64)
    assert float(span_phi(up_a @ G * 7.0, up_b)) == pytest.approx(float(span_phi(up_a, up_b)), abs=1e-12)


def test_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(10)
    a = torch.randn(12, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(span_phi, (a, b))
    assert torch.autograd.gradcheck(span_chordal, (a, b))
    assert torch.autograd.gradcheck(lambda x, y: span_chordal(x, y, squared=True), (a, b))
    up_a = torch.randn(10, 2, generator=g, dtype=torch.float64, requires_grad=True)
    down_a = torch.randn(2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    up_b = torch.randn(10, 3, generator=g, dtype=torch.float64, requires_grad=True)
    down_b = torch.randn(3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *f: lora_phi(*f, side="in"), (up_a, down_a, up_b, down_b))
    assert torch.autograd.gradcheck(lambda *f: lora_phi(*f, side="out"), (up_a, down_a, up_b, down_b))
    # batched
    ab = torch.randn(2, 12, 3, generator=g, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(2, 12, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: span_phi(x, y).sum(), (ab, bb))


def test_gradient_is_finite_with_repeated_singular_values():
    # Orthonormal factors: every singular value of ΔW equals 1, where SVD gradients divide by zero.
    g = torch.Generator().manual_seed(11)
    a = orthonormal(16, 4, g).requires_grad_()
    b = orthonormal(16, 4, g).requires_grad_()
    loss = span_phi(a, b) + span_chordal(a, b, squared=True)
    loss.backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all() and a.grad.abs().sum() > 0


def test_pushing_apart_reduces_phi():
    # A trainer's use: minimising φ by gradient descent moves the subspaces apart.
    g = torch.Generator().manual_seed(12)
    a = torch.randn(20, 3, generator=g, dtype=torch.float64)
    b = (a + 0.1 * torch.randn(20, 3, generator=g, dtype=torch.float64)).requires_grad_()
    history = []
    opt = torch.optim.SGD([b], lr=2.0)
    for _ in range(60):
        opt.zero_grad()
        loss = span_phi(a, b)
        history.append(float(loss.detach()))
        loss.backward()
        opt.step()
    assert all(later <= earlier + 1e-12 for earlier, later in zip(history, history[1:]))
    assert history[-1] < history[0] - 0.3


@pytest.mark.parametrize("eps", [1e-6, 0.05, 0.2, 0.5, 3.0])
def test_principal_angles_fast_path_stays_accurate(eps):
    # Angles all above ARCCOS_SAFE_ANGLE take the arccos-only path; mixed and small ones the
    # sine path. Either way they match scipy to near machine precision (relative for small ones).
    g = torch.Generator().manual_seed(int(eps * 1e6) % 1000)
    x = orthonormal(200, 16, g)
    y = near(x, eps, g)
    ref = scipy_angles(x, y)
    ours = principal_angles(x, y).numpy()
    assert np.allclose(ours, ref, rtol=1e-9, atol=1e-13)


def test_principal_angles_arccos_path_on_known_angles():
    theta = [0.31, 0.7, 1.2, math.pi / 2 - 1e-9]
    x, y = with_angles(theta, 10)
    assert np.allclose(principal_angles(x, y).numpy(), theta, rtol=1e-13, atol=1e-15)
