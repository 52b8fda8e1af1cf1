import pytest
import torch

from core.factored import (FRAME_MAX_INV_GRAM, dense_svd, frame, gram_factored, module_svd, modules_svd,
                           svd_from_factors)
from core.lora import LoraModule
from core.synthetic import random_lora

# Dense reference SVDs are many times slower with 2 threads on 2-core machines.
pytestmark = pytest.mark.usefixtures("one_thread")


def principal_angle_max(a: torch.Tensor, b: torch.Tensor) -> float:
    s = torch.linalg.svdvals(a.T @ b).clamp(max=1.0)
    return float(torch.arccos(s.min()))


@pytest.mark.parametrize("d_out,d_in,r", [(320, 320, 4), (640, 2048, 16), (1280, 2880, 8), (40, 30, 64)])
def test_factored_svd_matches_dense(d_out, d_in, r):
    g = torch.Generator().manual_seed(d_out + r)
    m = LoraModule("x", torch.randn(d_out, r, generator=g), torch.randn(r, d_in, generator=g), scale=0.5)
    f, d = module_svd(m), dense_svd(m)
    k = min(r, d_out, d_in)
    assert torch.allclose(f.S[:k], d.S[:k], rtol=1e-8, atol=1e-10)
    assert principal_angle_max(f.U[:, :k], d.U[:, :k]) < 1e-6
    assert principal_angle_max(f.V[:, :k], d.V[:, :k]) < 1e-6
    # reconstruction from the factored SVD is ΔW itself
    assert torch.allclose((f.U * f.S) @ f.V.T, m.delta(), atol=1e-10)


def test_effective_rank_and_dead():
    g = torch.Generator().manual_seed(0)
    b = torch.randn(64, 2, generator=g)
    up = torch.cat([b, b @ torch.randn(2, 2, generator=g)], dim=1)  # rank 2 in 4 columns
    m = LoraModule("x", up, torch.randn(4, 50, generator=g))
    assert module_svd(m).effective_rank == 2
    dead = LoraModule("y", torch.zeros(64, 4), torch.randn(4, 50, generator=g))
    res = module_svd(dead)
    assert res.dead and res.effective_rank == 0 and torch.isfinite(res.U).all()


def test_batched_equals_loop():
    lora = random_lora("sd1", rank=4, seed=3, limit=12)
    mods = list(lora.modules.values())
    loop = modules_svd(mods)
    ups = torch.stack([m.up.double() * m.scale for m in mods[:4]])
    downs = torch.stack([m.down.double() for m in mods[:4]])
    batched = svd_from_factors(ups, downs)
    for j in range(4):
        assert torch.allclose(batched.S[j], loop[j].S)


def _check_frame(x: torch.Tensor, fr, tol: float) -> None:
    q = fr.lift(torch.eye(fr.coords.shape[0], dtype=x.dtype), x)
    assert torch.allclose(q.T @ q, torch.eye(q.shape[1], dtype=x.dtype), atol=tol)
    assert torch.allclose(q @ fr.coords, x, atol=tol * float(x.abs().max()))
    # its span is x's: projecting x onto it leaves nothing
    assert float((x - q @ (q.T @ x)).norm() / x.norm()) < tol


def test_frame_cholesky_when_well_conditioned():
    g = torch.Generator().manual_seed(1)
    # columns of very different lengths (balancing makes them equal for the Gram)
    x = torch.randn(1280, 96, generator=g, dtype=torch.float64) * torch.logspace(-3, 3, 96, dtype=torch.float64)
    fr = frame(x)
    assert fr.kind == "cholesky" and fr.coords.shape == (96, 96)
    _check_frame(x, fr, 1e-11)


@pytest.mark.parametrize("case", ["duplicate", "nearly dependent", "zero column", "wide"])
def test_frame_householder_otherwise(case):
    g = torch.Generator().manual_seed(2)
    b = torch.randn(640, 32, generator=g, dtype=torch.float64)
    x = {"duplicate": torch.cat([b, b], 1),
         "nearly dependent": torch.cat([b, b + 1e-7 * torch.randn(640, 32, generator=g, dtype=torch.float64)], 1),
         "zero column": torch.cat([b, torch.zeros(640, 1, dtype=torch.float64)], 1),
         "wide": torch.randn(20, 32, generator=g, dtype=torch.float64)}[case]
    fr = frame(x)
    assert fr.kind == "householder"
    q = fr.q
    assert torch.allclose(q.T @ q, torch.eye(q.shape[1], dtype=x.dtype), atol=1e-12)
    assert torch.allclose(q @ fr.coords, x, atol=1e-12)


def test_frame_threshold_is_the_documented_bound():
    """Just inside the bound: Cholesky, and still accurate; the bound is on ‖R⁻¹‖²_F."""
    g = torch.Generator().manual_seed(3)
    b = torch.randn(2048, 8, generator=g, dtype=torch.float64)
    for eps, kind in ((1e-2, "cholesky"), (1e-5, "householder")):
        x = torch.cat([b, b + eps * torch.randn(2048, 8, generator=g, dtype=torch.float64)], 1)
        fr = frame(x)
        assert fr.kind == kind, (eps, fr.kind, FRAME_MAX_INV_GRAM)
        _check_frame(x, fr, 1e-9)


def test_leading_svd_matches_full_svd_or_declines():
    from core.factored import LEADING_SVD_MIN_RATIO, leading_svd
    g = torch.Generator().manual_seed(4)
    for shape in ((96, 64), (64, 96)):
        m = torch.randn(*shape, generator=g, dtype=torch.float64)
        res = leading_svd(m, 10)
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        assert torch.allclose(res.S, s[:10], rtol=1e-12)
        # the same rank-10 truncation (vectors up to sign), orthonormal factors
        assert torch.allclose((res.U * res.S) @ res.V.T, (u[:, :10] * s[:10]) @ vh[:10], atol=1e-11)
        assert torch.allclose(res.U.T @ res.U, torch.eye(10, dtype=torch.float64), atol=1e-12)
    # σ_p below the ratio: declines rather than lose digits
    q = torch.linalg.qr(torch.randn(50, 50, generator=g, dtype=torch.float64))[0]
    s = torch.ones(50, dtype=torch.float64)
    s[5:] = LEADING_SVD_MIN_RATIO / 10
    m = (q * s) @ q.T
    assert leading_svd(m, 5) is not None and leading_svd(m, 6) is None


@pytest.mark.parametrize("top", [None, 20])
def test_gram_factored_measures_equal_the_dense_ones(top):
    """energy, column and row bases, factors, column/row factors and projections of
    scale·a·bᵀ from its two Cholesky factors, against the dense matrix; top: a and
    b zero below row 20 (a source's columns of frame coordinates), said by rows."""
    g = torch.Generator().manual_seed(4)
    a, b = (torch.randn(n, 6, generator=g, dtype=torch.float64) for n in (50, 70))
    a[:, 1] += 3 * a[:, 0]                                    # correlated columns: still well conditioned
    if top is not None:
        a[top:], b[top:] = 0, 0
    res = gram_factored(a[None], b[None], [-0.7], [top])[0]
    assert res.rows == top
    dw = -0.7 * a @ b.T
    assert res is not None and res.rank == 6
    assert abs(res.energy - float((dw ** 2).sum())) < 1e-12 * float((dw ** 2).sum())
    basis = res.col_basis
    assert torch.allclose(basis.T @ basis, torch.eye(6, dtype=torch.float64), atol=1e-13)
    u = torch.linalg.svd(dw)[0][:, :6]
    assert torch.allclose(basis @ basis.T, u @ u.T, atol=1e-12)           # the same column space
    rows = res.row_basis
    v = torch.linalg.svd(dw)[2][:6].T
    assert torch.allclose(rows.T @ rows, torch.eye(6, dtype=torch.float64), atol=1e-13)
    assert torch.allclose(rows @ rows.T, v @ v.T, atol=1e-12)             # the same row space
    left, right = res.factors()
    assert torch.allclose(left @ right.T, dw, atol=1e-13)
    assert torch.allclose(res.col_factor() @ res.col_factor().T, dw @ dw.T, atol=1e-12)
    assert torch.allclose(res.row_factor() @ res.row_factor().T, dw.T @ dw, atol=1e-12)
    qu, qv = (torch.linalg.qr(torch.randn(n, 3, generator=g, dtype=torch.float64))[0] for n in (50, 70))
    proj, cross = res.projected(qu, qv, 2.0)
    assert torch.allclose(proj, 2.0 * qu.T @ dw @ qv, atol=1e-13)
    assert torch.allclose(cross, qu.T @ basis, atol=1e-14)


@pytest.mark.parametrize("case", ["rank-deficient down", "rank-deficient up", "nearly dependent", "dead"])
def test_gram_factored_declines_where_only_an_svd_is_exact(case):
    g = torch.Generator().manual_seed(5)
    a, b = (torch.randn(n, 6, generator=g, dtype=torch.float64) for n in (50, 70))
    scale = 1.0
    if case == "rank-deficient down":
        b[:, 1] = b[:, 0]                     # ΔW's column space is smaller than span(a)
    elif case == "rank-deficient up":
        a[:, 2] = 2 * a[:, 3]
    elif case == "nearly dependent":
        b[:, 1] = b[:, 0] + 1e-4 * b[:, 1]
    else:
        scale = 0.0
    good = torch.randn(50, 6, generator=g, dtype=torch.float64), torch.randn(70, 6, generator=g, dtype=torch.float64)
    # batched with a well-conditioned one: only the bad one declines
    got = gram_factored(torch.stack([good[0], a]), torch.stack([good[1], b]), [1.0, scale])
    assert got[0] is not None and got[1] is None
