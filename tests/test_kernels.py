import numpy as np
import pytest
import torch

from core.device import linalg_threads
from core.errors import LoraError
from core.grassmann import log_cos_product, principal_cosines
from core.kernels import CPD, INDEFINITE, KERNELS, PD, make_kernel
from tests.kernel_reference import brute_kernel, det_xty, valid_params


@pytest.fixture(autouse=True)
def one_thread():
    """Small torch linear algebra is far faster on one thread on these machines."""
    with linalg_threads(1):
        yield


def orthonormal(d, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]


def near(x, eps, seed):
    """An orthonormal basis close to x (related subspaces, δ well above 0)."""
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(x + eps * torch.randn(x.shape, generator=g, dtype=torch.float64))[0]


def kernel_value(name, x, y, **params):
    k = make_kernel(name, **params)
    return float(k.from_cosines(principal_cosines(x, y), x.shape[1], y.shape[1]))


def gram(name, points, **params):
    k = make_kernel(name, **params)
    n = len(points)
    with linalg_threads(1):
        if len({p.shape[1] for p in points}) == 1:   # one batched call for all pairs
            stacked = torch.stack(points)
            return k.from_cosines(principal_cosines(stacked[:, None], stacked[None, :]))
        out = np.empty((n, n))
        for i in range(n):
            for j in range(n):
                out[i, j] = k.from_cosines(principal_cosines(points[i], points[j]),
                                           points[i].shape[1], points[j].shape[1])
    return out


def lines_gr12(n=12):
    """n lines through the origin of R², equally spaced in angle (points of Gr(1,2))."""
    a = np.arange(n) * np.pi / n
    return [torch.tensor([[np.cos(t)], [np.sin(t)]], dtype=torch.float64) for t in a]


def test_registry_labels_follow_the_measurements():
    assert len(KERNELS) == 15
    for name, spec in KERNELS.items():
        assert name == f"{spec.embedding}-{spec.form}"
        if spec.embedding == "projection":
            assert spec.status == (CPD if spec.form == "log" else PD)
        elif spec.embedding == "bc":
            assert spec.status == (PD if spec.form == "laplace" else INDEFINITE)
        else:
            assert spec.status == (CPD if spec.form == "log" else PD)
    assert make_kernel().name == "projection-rbf"


BRUTE_CASES = [(10, 3, 3, False), (10, 3, 3, True), (12, 2, 4, False), (12, 4, 2, True)]


@pytest.mark.parametrize("name,d,k,l,related", [
    (name, *case) for name in sorted(KERNELS) for case in BRUTE_CASES
    if KERNELS[name].embedding == "projection" or case[1] == case[2]])   # BC: equal ranks only
def test_value_matches_brute_force(name, d, k, l, related):
    x = orthonormal(d, k, 1)
    y = near(orthonormal(d, l, 2) if k != l else x, 0.4, 3) if related else orthonormal(d, l, 2)
    if related and k != l:
        y = torch.linalg.qr(torch.cat([x[:, :min(k, l)], y], 1))[0][:, :l]
    params = valid_params(name, max(k, l))
    ref = brute_kernel(name, x.numpy(), y.numpy(), **params)
    assert np.isclose(kernel_value(name, x, y, **params), ref, rtol=1e-10, atol=1e-13)


@pytest.fixture(scope="module")
def r64_bases():
    with linalg_threads(1):
        x = orthonormal(768, 64, 5)
        return x, orthonormal(768, 64, 6), near(x, 0.01, 7)


def test_binet_cauchy_near_underflow_r64(r64_bases):
    """r = 64 at d = 768: δ of unrelated subspaces ≈ 1e-48 (0 in float32);
    related ones (mean angle ~15°) give δ ≈ 0.1. Both against np.linalg.det."""
    x, far, close = r64_bases
    delta_far, delta_close = det_xty(x.numpy(), far.numpy()), det_xty(x.numpy(), close.numpy())
    assert delta_far < 1e-30 and 1e-4 < delta_close < 0.9
    assert float(torch.linalg.det(x.float().T @ far.float())) == 0.0   # the pitfall
    with linalg_threads(1):
        cos_far, cos_close = principal_cosines(x, far), principal_cosines(x, close)
    assert np.isclose(float(log_cos_product(cos_far)), np.log(delta_far), rtol=1e-10)
    for name in [n for n in KERNELS if not n.startswith("projection")]:
        params = valid_params(name, 64)
        k = make_kernel(name, **params)
        for y, cos in ((far, cos_far), (close, cos_close)):
            ref = brute_kernel(name, x.numpy(), y.numpy(), **params)
            assert np.isclose(float(k.from_cosines(cos)), ref, rtol=1e-9), name


@pytest.mark.parametrize("name,grassmannian", [
    (name, g) for name, spec in KERNELS.items() if spec.status in (PD, CPD)
    for g in [(1, 2), (1, 3), (2, 4), (3, 6)] + (["mixed ranks"] if spec.embedding == "projection" else [])])
def test_labelled_kernels_are_pd_or_cpd_on_random_points(name, grassmannian):
    if grassmannian == "mixed ranks":
        points = [orthonormal(8, 1 + i % 4, 40 + i) for i in range(14)]
        p = 4
    else:
        p, d = grassmannian
        points = [orthonormal(d, p, 20 + i) for i in range(14)]
        points += [near(points[0], 0.05, 60 + i) for i in range(3)]  # a tight group too
    k = gram(name, points, **valid_params(name, p))
    assert np.allclose(k, k.T)
    tol = 1e-8 * np.abs(np.linalg.eigvalsh(k)).max()
    if KERNELS[name].status == PD:
        assert np.linalg.eigvalsh(k)[0] >= -tol
    else:
        j = np.eye(len(k)) - 1.0 / len(k)
        assert np.linalg.eigvalsh(j @ k @ j)[0] >= -tol


@pytest.mark.parametrize("name", [n for n, s in KERNELS.items() if s.status == INDEFINITE])
def test_indefinite_labels_are_earned_on_gr12(name):
    """Twelve lines in the plane: each kernel labelled indefinite has a clearly
    negative eigenvalue; the |det| logarithm is not even conditionally PD."""
    k = gram(name, lines_gr12(), **valid_params(name, 1))
    evals = np.linalg.eigvalsh(k)
    j = np.eye(len(k)) - 1.0 / len(k)
    centred = np.linalg.eigvalsh(j @ k @ j)
    assert centred[0] < -1e-3 * np.abs(evals).max()
    if KERNELS[name].form != "log":
        assert evals[0] < -1e-3 * np.abs(evals).max()


def test_pd_counterparts_stay_pd_on_the_same_lines():
    """The same twelve lines do not break the det² and Laplace forms (so the test
    above is about the kernels, not the point set)."""
    for name in ("bc-laplace", "bc2-poly", "bc2-rbf", "bc2-binomial", "projection-poly"):
        k = gram(name, lines_gr12(), **valid_params(name, 1))
        assert np.linalg.eigvalsh(k)[0] >= -1e-8 * np.abs(np.linalg.eigvalsh(k)).max(), name


def test_self_value_equals_kernel_of_x_with_itself():
    x = orthonormal(20, 5, 9)
    for name in KERNELS:
        k = make_kernel(name, **valid_params(name, 5))
        b = x.numpy()
        assert np.isclose(float(k.self_value(5)), brute_kernel(name, b, b, **valid_params(name, 5)))


def test_parameter_validation():
    with pytest.raises(LoraError, match="unknown kernel 'nope'.*projection-rbf"):
        make_kernel("nope")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(LoraError, match="β > 0"):
            make_kernel("projection-rbf", beta=bad)
    with pytest.raises(LoraError, match="β > 1"):
        make_kernel("bc-binomial", beta=1.0)
    assert make_kernel("bc2-binomial", beta=1.01).beta == 1.01
    with pytest.raises(LoraError, match="α > 0"):
        make_kernel("projection-binomial", beta=10, alpha=0)
    with pytest.raises(LoraError, match="positive integer α"):
        make_kernel("projection-poly", alpha=2.5)
    forced = make_kernel("projection-poly", alpha=2.5, force=True)
    assert forced.status == INDEFINITE and forced.spec.status == PD
    assert make_kernel("projection-poly", alpha=3).status == PD
    # the projection binomial needs β > p, checked once the ranks are known
    k = make_kernel("projection-binomial", beta=4.0)
    k.check_ranks(3)
    with pytest.raises(LoraError, match="β > p.*4"):
        k.check_ranks(4)
    # the logarithm kernels have no parameters, so nothing to refuse
    assert make_kernel("projection-log", beta=-5).params() == {}


def test_cross_rank_projection_statistic_is_half_the_projector_distance():
    """p − s with p = (k + l)/2 equals ½‖XXᵀ − YYᵀ‖²_F, so the projection kernels
    across ranks are the same functions of a Euclidean distance between projectors."""
    for k, l in ((2, 5), (4, 1), (3, 3)):
        x, y = orthonormal(9, k, k), orthonormal(9, l, 10 + l)
        half_dist = 0.5 * float(torch.linalg.norm(x @ x.T - y @ y.T) ** 2)
        s = float((principal_cosines(x, y) ** 2).sum())
        assert np.isclose(0.5 * (k + l) - s, half_dist, rtol=1e-12)
        kern = make_kernel("projection-laplace", beta=0.8)
        assert np.isclose(float(kern.from_cosines(principal_cosines(x, y), k, l)),
                          np.exp(-0.8 * np.sqrt(half_dist)), rtol=1e-12)


def test_binet_cauchy_refuses_unequal_ranks():
    x, y = orthonormal(10, 2, 1), orthonormal(10, 3, 2)
    with pytest.raises(ValueError, match="equal ranks"):
        make_kernel("bc-laplace").from_cosines(principal_cosines(x, y), 2, 3)


def test_batched_cosines():
    xs = torch.stack([orthonormal(15, 3, i) for i in range(4)])
    ys = torch.stack([orthonormal(15, 3, 10 + i) for i in range(4)])
    for name in ("projection-laplace", "bc2-poly"):
        k = make_kernel(name, **valid_params(name, 3))
        batched = k.from_cosines(principal_cosines(xs, ys))
        single = [brute_kernel(name, xs[i].numpy(), ys[i].numpy(), **valid_params(name, 3))
                  for i in range(4)]
        assert np.allclose(batched, single, rtol=1e-10)
