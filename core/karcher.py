"""The weighted Karcher (Fréchet) mean of subspaces on Gr(p, d), converged for
any spread, with a certificate of what was reached.

A point is an orthonormal basis X (d×p); only its span matters. Everything is
batched over leading dimensions (modules of equal shape stacked together):
bases (…, K, d, p), weights (K,) or (…, K), normalised to Σ w_k = 1.

The mean lives in span(U_1 … U_K) (Log_X(U_k) ∈ span(X, U_k), Exp_X(H) ∈
span(X, H)), so it is computed on Gr(p, R), R = Kp, in coordinates of one QR
of the stacked bases, O(d·R²), then lifted once; every step costs O(K·R·p²)
whatever d.

The method is a Riemannian trust-region Newton iteration (Absil, Baker &
Gallivan 2007) with truncated CG (Steihaug–Toint) on the exact Hessian of
f(X) = ½Σ w_k d_geo²(X, U_k) (core.grassmann.SqDistanceHessian), from
the extrinsic (flag) mean. Far-apart sources make f flat or non-convex in
some directions; plain or Barzilai–Borwein gradient descent then crawls
(measured: stuck at ‖grad‖ ≈ 2e-2 after 50 steps for unrelated rank-64 LoRAs)
where Newton steps converge quadratically and the trust region handles the
negative curvature. It stops on ‖grad f‖ ≤ tol, never on a change of basis.

At the result the smallest eigenvalue of the Riemannian Hessian is reported
twice: a lower bound Σ w_k·min_α α·cot α (Weyl; > 0 certifies a strict local
minimum) and a Lanczos estimate (an upper bound on it; > 0 says local minimum,
< 0 a saddle).

References: Edelman–Arias–Smith 1998; Absil–Mahony–Sepulchre 2004, 2008;
Bendokat–Zimmermann–Absil, arXiv 2011.13699; Afsari 2011 (uniqueness within a
geodesic ball of radius π/4 on Gr, sectional curvature in [0, 2]).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import LoraError
from .grassmann import (SqDistanceHessian, grassmann_exp, grassmann_log, hessian_lower_bound, log_frame,
                        tangent_projection)
from .means import Gram, check_weights, eigengap

# The π/4 of Afsari 2011 (½·min(injectivity radius π/2, π/√(max curvature 2))).
# Two readings, both reported:
#  - afsari: all sources within geodesic distance √Σθ² < π/4 of the mean — the
#    theorem's sufficient condition for a unique mean (rarely met at p = 64,
#    where 64 angles of 0.1 rad already give 0.8);
#  - unique: all sources within a largest principal angle < π/4 of the mean. The
#    Hessian of ½d²(·, U) has eigenvalues α·cot α over the roots α ∈ {θ_i ± θ_j,
#    θ_i} of Gr(p, d), all positive when θ_max < π/4, so every term is strictly
#    convex around the mean and it is an isolated minimum; beyond that the cost
#    stops being convex and means multiply.
UNIQUE_RADIUS = math.pi / 4
DISTANCES = ("geodesic", "chordal")   # Fréchet means offered (see karcher_mean)
RHO_ACCEPT = 0.1              # a step is taken when it achieves this share of the model's decrease
INNER_KAPPA = 0.1             # tCG stops at ‖r‖ ≤ ‖g‖·min(‖g‖^θ, κ) ...
# ... with θ = 1 (quadratic outer convergence) where the Weyl bound certifies convexity (close
# sources: CG is short anyway, and one Newton step fewer matters), else θ = ½ (superlinear):
# measured on unrelated SDXL rank-64 sides, 30–40 % fewer Hessian products for a few more steps.
INNER_THETA_NONCONVEX = 0.5
# Newton steps a side at most: unrelated SDXL rank-64 sides measured 18–58 (a long flat valley
# with negative curvature before the quadratic phase); close sources take 2.
MAX_NEWTON_STEPS = 200
MAX_INNER = 400               # Hessian-vector products per tCG solve at most
# Hessian-vector products inside tCG: float32 halves their cost; the Newton step only
# needs a relative accuracy ~min(‖g‖, κ), far above float32 rounding, and the gradient
# that decides convergence is computed at the input precision.
PRODUCT_DTYPE = torch.float32
# The geodesic start, the flag mean, comes from a float32 eigensolver where the relative
# eigen-gap (λ_p − λ_{p+1})/λ_1 exceeds this (its top-p space is then within ~1e-6 rad of
# the float64 one: Newton takes the same steps to the same point, the consensus is right to
# ~1e-7); below it the start is taken in float64, since a small gap makes the start, and
# possibly the critical point reached, sensitive to rounding (order invariance).
START_GAP = 0.1
# ... and the consensus it reports is taken again in float64 when an eigenvalue lies within
# this of ½ (float32 eigenvalues err by ~R·ε₃₂·λ_1 ≈ 2e-5 at R = 256), so the reported
# consensus rank, a count of eigenvalues > ½, is the one rank "auto" uses (core.merge.means).
CONSENSUS_HALF_ATOL = 1e-4
# A candidate's log frame tries log_frame's eigh route (grassmann.CLOSE_MIN_COS) when every
# angle at the current iterate is below this: a step seldom moves an angle from 1.2 past
# 1.47 rad, and where one does the route sees it and takes the SVD.
CLOSE_ANGLE = 1.2
LANCZOS_STEPS = 24            # Hessian-vector products for the smallest-eigenvalue estimate
DETERMINISTIC_CHOICE = (
    "two sources: the point at fraction t = w2/(w1+w2) on the geodesic from the first "
    "source chosen by the SVD of U1ᵀU2; more sources: the critical point reached by the "
    "Riemannian trust-region Newton iteration from the extrinsic (flag) mean, whose ties "
    "between equal eigenvalues are broken by the eigensolver's order")


@dataclass
class KarcherResult:
    """Per batch element: the mean basis and how it was reached.

    radius = max_k d_geo(mean, U_k); max_angle = largest principal angle of any
    source to the mean; pairwise_* = the same between the sources themselves;
    unique = max_angle < π/4 and afsari = radius < π/4 (see UNIQUE_RADIUS; for
    the chordal mean unique = a nonzero eigen-gap λ_p > λ_{p+1});
    converged = grad_norm ≤ tol; iterations = Newton (outer) steps, each one
    gradient evaluation; hess_products = Hessian-vector products in all tCG
    solves; hessian_lower ≤ λ_min(Hess f) (Weyl bound); hessian_min = a Lanczos
    estimate of λ_min (an upper bound on it) where the bound is ≤ 0, else the
    bound itself; local_min = hessian_min > 0 (certified when hessian_lower > 0);
    consensus = eigenvalues of Σ w_k U_kU_kᵀ (Σ w = 1), descending (…, Kp).
    """

    mean: torch.Tensor
    iterations: torch.Tensor
    grad_norm: torch.Tensor
    radius: torch.Tensor
    max_angle: torch.Tensor
    pairwise_distance: torch.Tensor
    pairwise_max_angle: torch.Tensor
    unique: torch.Tensor
    afsari: torch.Tensor
    converged: torch.Tensor
    hess_products: torch.Tensor
    hessian_lower: torch.Tensor
    hessian_min: torch.Tensor
    local_min: torch.Tensor
    consensus: torch.Tensor
    distance: str = "geodesic"
    choice: str = DETERMINISTIC_CHOICE


def _inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum((-2, -1))


class _Cost:
    """f(X) = ½Σ w_k d_geo²(X, U_k) at one iterate (batched): the log frames of
    every source, the cost and the Riemannian gradient −Σ w_k Log_X U_k; on
    demand (accepted iterates only) the Hessian acting on tangents η (d×p,
    Xᵀη = 0: it maps them to tangents, so no basis of the tangent space is
    formed — a complete QR of X and X_⊥ᵀE cost more than the products they
    shorten by p of d rows, measured on SDXL sides)."""

    def __init__(self, x: torch.Tensor, frame: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                 w: torch.Tensor) -> None:
        self.x, self.frame, self.w = x, frame, w
        p, self.theta, e = frame
        self.cost = 0.5 * (w * (self.theta * self.theta).sum(-1)).sum(-1)
        # −Σ w_k E_k·diag(θ_k)·P_kᵀ, the weights and angles folded into the p×p factors
        self.grad = -(e @ (p * (self.theta * w.unsqueeze(-1)).unsqueeze(-2)).transpose(-1, -2)).sum(-3)
        self.gnorm = torch.linalg.vector_norm(self.grad, dim=(-2, -1))
        self._hess = None

    @classmethod
    def at(cls, x: torch.Tensor, coords: torch.Tensor, w: torch.Tensor, close: bool = False) -> "_Cost":
        """close: every source is expected well within π/2 of x (log_frame's eigh route)."""
        return cls(x, log_frame(x.unsqueeze(-3), coords, close), w)

    def hessian(self, exact: bool = False) -> SqDistanceHessian:
        """The Hessian on tangents; its products in PRODUCT_DTYPE unless exact."""
        if exact:
            return SqDistanceHessian(*self.frame, self.w)
        if self._hess is None:
            self._hess = SqDistanceHessian(*self.frame, self.w, PRODUCT_DTYPE)
        return self._hess

    def where(self, take: torch.Tensor, other: "_Cost") -> "_Cost":
        """Per batch element: self where take, else other."""
        def pick(a, b):
            return torch.where(take.reshape(take.shape + (1,) * (a.dim() - take.dim())), a, b)
        return _Cost(pick(self.x, other.x), tuple(pick(a, b) for a, b in zip(self.frame, other.frame)), self.w)


def _tcg(f: _Cost, delta: torch.Tensor, active: torch.Tensor, tol: float):
    """Steihaug–Toint truncated CG on the model ⟨g,η⟩ + ½⟨η,Hη⟩ within ‖η‖ ≤ Δ,
    on tangents η (d×p), batched: every element runs its own CG, stopped
    elements are frozen. ⟨η,η⟩, ⟨η,d⟩ and ⟨d,d⟩ follow
    the usual recurrences (Conn, Gould & Toint 2000, §7.5), so each step costs
    one product and two inner products. The residual target ‖g‖·min(‖g‖^θ, κ)
    (INNER_KAPPA) gives superlinear convergence; below tol/2 it is not needed
    (the next gradient is the residual plus O(‖η‖²)).
    Returns η, Hη (tangent up to the float32 rounding of the products) and the
    Hessian-vector products used per element."""
    hess = f.hessian()
    g = f.grad
    eta, heta = torch.zeros_like(g), torch.zeros_like(g)
    r = g.clone()
    rr = _inner(r, r)
    d = -r
    ee, ed, dd = torch.zeros_like(rr), torch.zeros_like(rr), rr.clone()
    theta = torch.where(hess.lower_bound() > 0, 1.0, INNER_THETA_NONCONVEX)
    target = (f.gnorm * (f.gnorm ** theta).clamp_max(INNER_KAPPA)).clamp_min(0.5 * tol)
    running = active.clone()
    products = torch.zeros_like(f.gnorm, dtype=torch.long)
    tiny = torch.finfo(rr.dtype).tiny
    delta2 = delta * delta
    # Per iteration ~40 small operations on (batch,) scalars cost as much as the product on a
    # CPU: the boundary step τ is formed only when some element leaves the region, and the
    # masks are skipped while every element runs (the same values either way).
    every = bool(running.all())
    for _ in range(MAX_INNER if bool(running.any()) else 0):
        hd = hess(d)
        products += running.long()
        dhd = _inner(d, hd)
        alpha = rr / torch.where(dhd > 0, dhd, torch.ones_like(dhd))
        ee_new = ee + 2 * alpha * ed + alpha * alpha * dd
        outside = (dhd <= 0) | (ee_new >= delta2)
        step, leaving = alpha, bool(outside.any())
        if leaving:
            # τ ≥ 0 with ‖η + τd‖ = Δ
            tau = (-ed + (ed * ed + dd * (delta2 - ee).clamp_min(0)).sqrt()) / dd.clamp_min(tiny)
            step = torch.where(outside, tau, alpha)
        if not every:
            step = torch.where(running, step, torch.zeros_like(step))
        if leaving:
            running = running & ~outside
        step = step[..., None, None]
        eta.add_(step * d)
        step_hd = step * hd
        heta.add_(step_hd)
        r.add_(step_hd)
        rr_new = _inner(r, r)
        running = running & (rr_new.sqrt() > target)
        left = int(running.sum())
        if not left:                         # the rest only prepares the next direction
            break
        every = left == running.numel()
        beta = rr_new / rr.clamp_min(tiny)
        if every:
            d = d.mul_(beta[..., None, None]).sub_(r)
            ed, dd = beta * (ed + alpha * dd), rr_new + beta * beta * dd
            ee, rr = ee_new, rr_new
            continue
        d = torch.where(running[..., None, None], -r + beta[..., None, None] * d, d)
        ed = torch.where(running, beta * (ed + alpha * dd), ed)
        dd = torch.where(running, rr_new + beta * beta * dd, dd)
        ee = torch.where(running, ee_new, ee)
        rr = torch.where(running, rr_new, rr)
    return eta, heta, products


def _trust_region(x, coords, w, tol, max_iter, close: bool = False):
    """Riemannian trust-region Newton iteration (batched). Returns the final
    _Cost, outer steps and Hessian-vector products per element. close: the
    start is expected near every source (log_frame's eigh route)."""
    f = _Cost.at(x, coords, w, close)
    p = x.shape[-1]
    delta_max = math.sqrt(p) * math.pi / 2        # the diameter of Gr(p, ·)
    delta = torch.full_like(f.cost, delta_max / 8)
    steps = torch.zeros_like(f.cost, dtype=torch.long)
    products = torch.zeros_like(steps)
    eps = torch.finfo(x.dtype).eps
    while True:
        active = (f.gnorm > tol) & (steps < max_iter) & (delta > eps)
        if not bool(active.any()):
            return f, steps, products
        eta, heta, used = _tcg(f, delta, active, tol)
        products += used
        cand = _Cost.at(grassmann_exp(f.x, tangent_projection(f.x, eta)), coords, w,
                        bool((f.theta.amax() < CLOSE_ANGLE).all()))
        model = -(_inner(f.grad, eta) + 0.5 * _inner(eta, heta))
        # Near convergence both decreases are at rounding level; this keeps ρ ≈ 1 there (Manopt's rule).
        reg = 1e3 * eps * f.cost.abs().clamp_min(1.0)
        rho = (f.cost - cand.cost + reg) / (model + reg)
        norm = torch.linalg.vector_norm(eta, dim=(-2, -1))
        delta = torch.where(active & (rho < 0.25), delta / 4,
                            torch.where(active & (rho > 0.75) & (norm >= 0.99 * delta),
                                        (2 * delta).clamp_max(delta_max), delta))
        take = active & (rho > RHO_ACCEPT) & torch.isfinite(cand.cost)
        if bool(take.all()):
            f = cand
        elif bool(take.any()):
            f = cand.where(take, f)
        steps += active.long()


def _lanczos_min(f: _Cost, steps: int = LANCZOS_STEPS) -> torch.Tensor:
    """Smallest Ritz value of the Riemannian Hessian (exact products) after `steps`
    Lanczos steps with full reorthogonalisation, on tangents, from a fixed
    pseudo-random tangent start (deterministic). An element whose Krylov space
    closes early (an invariant subspace: exact Ritz values) keeps its
    tridiagonal block; the unused rows repeat its first Rayleigh quotient,
    which cannot lower the minimum."""
    hess = f.hessian(exact=True)
    gen = torch.Generator().manual_seed(20240601)
    v = tangent_projection(f.x, torch.randn(f.x.shape, generator=gen, dtype=f.x.dtype).to(f.x.device))
    steps = max(1, min(steps, (f.x.shape[-2] - f.x.shape[-1]) * f.x.shape[-1]))
    v = v / torch.linalg.vector_norm(v, dim=(-2, -1), keepdim=True)
    shape = v.shape
    # the Lanczos vectors as rows, so that reorthogonalising against all of them is two
    # matrix-vector products (classical Gram–Schmidt, twice is enough), not 2j small steps
    basis = v.new_zeros(*shape[:-2], steps, shape[-2] * shape[-1])
    basis[..., 0, :] = v.flatten(-2)
    alphas, betas = [], []
    closed = torch.zeros_like(f.cost, dtype=torch.bool)
    for j in range(steps):
        vj = basis[..., j, :].reshape(shape)
        hv = hess(vj)
        alpha = _inner(vj, hv)
        alphas.append(torch.where(closed, alphas[0], alpha) if alphas else alpha)
        q, h = basis[..., : j + 1, :], hv.flatten(-2).unsqueeze(-1)
        for _ in range(2):
            h = h - q.transpose(-1, -2) @ (q @ h)
        hv = h.reshape(shape)
        if j == steps - 1:
            break
        beta = torch.linalg.vector_norm(hv, dim=(-2, -1))
        closed = closed | (beta <= 1e-10 * alphas[0].abs().clamp_min(1.0))
        betas.append(torch.where(closed, torch.zeros_like(beta), beta))
        basis[..., j + 1, :] = torch.where(closed[..., None, None], torch.zeros_like(hv),
                                           hv / beta.clamp_min(torch.finfo(beta.dtype).tiny)[..., None, None]
                                           ).flatten(-2)
    t = torch.diag_embed(torch.stack(alphas, -1))
    if betas:
        off = torch.diag_embed(torch.stack(betas, -1), offset=1)
        t = t + off + off.transpose(-1, -2)
    return torch.linalg.eigvalsh(t)[..., 0]


def _pairwise(gram: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest pairwise geodesic distance and principal angle among the K sources, from
    the cosines alone: cos² = the eigenvalues of B·Bᵀ for the U_iᵀU_j blocks B of their
    Gram (…, Kp, Kp), one batched eigvalsh (a report figure: arccos is ~1e-8 off only for
    tiny angles, as from singular values)."""
    lead, p = gram.shape[:-2], gram.shape[-1] // k
    if k < 2:
        z = gram.new_zeros(lead)
        return z, z
    i, j = torch.triu_indices(k, k, 1, device=gram.device)
    blocks = gram.reshape(*lead, k, p, k, p).transpose(-3, -2)[..., i, j, :, :]
    theta = torch.arccos(torch.linalg.eigvalsh(blocks @ blocks.transpose(-1, -2)).clamp(0.0, 1.0).sqrt())
    return (torch.linalg.vector_norm(theta, dim=-1).amax(-1), theta.amax((-1, -2)))


def _span_coordinates(bases: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """An orthonormal basis Q (…, d, Kp) of span(U_1 … U_K) and the coordinates
    C_k = QᵀU_k (…, K, Kp, p), or (None, bases) when Kp ≥ d. Q is an isometry
    onto the span, so angles, costs and gradients are the same in coordinates."""
    *lead, k, d, p = bases.shape
    if k * p >= d:
        return None, bases
    q, r = torch.linalg.qr(bases.movedim(-3, -2).reshape(*lead, d, k * p))
    return q, r.reshape(*lead, k * p, k, p).movedim(-2, -3)


def karcher_mean(bases: torch.Tensor, weights, tol: float | None = None, max_iter: int = MAX_NEWTON_STEPS,
                 distance: str = "geodesic") -> KarcherResult:
    """Weighted Fréchet mean of K points on Gr(p, d), batched: bases (…, K, d, p).

    distance="geodesic" (the Karcher mean): minimises ½Σ w_k d_geo²(X, U_k) by
    the trust-region Newton iteration (module docstring) from the flag mean,
    stops on ‖grad‖ ≤ tol or after max_iter Newton steps. Two sources: the
    closed form Exp_{U1}(t·Log_{U1}U2), t = w2/(w1+w2), no iteration.
    distance="chordal": the mean under √Σsin²θ, which is exactly the flag
    (extrinsic) mean, core.means.flag_mean. Other distances have no mean here.

    Weights must be positive (any scale; normalised). tol defaults to 1e-8 rad
    in float64, 1e-5 in float32. Outside the π/4 ball the mean is not unique;
    the result is still a finite orthonormal basis, by DETERMINISTIC_CHOICE.
    """
    if distance not in DISTANCES:
        raise LoraError(f"no Fréchet mean offered for distance '{distance}' (supported: "
                        f"{', '.join(DISTANCES)})")
    if bases.dim() < 3 or bases.shape[-1] > bases.shape[-2]:
        raise LoraError(f"bases must be (…, K, d, p) with p ≤ d, got {tuple(bases.shape)}")
    w = check_weights(weights, bases.shape[-3], bases).expand(bases.shape[:-2])
    if tol is None:
        tol = 1e-8 if bases.dtype == torch.float64 else 1e-5
    span, coords = _span_coordinates(bases)
    p = bases.shape[-1]
    gram = Gram.of(coords)
    gapped = False
    if distance == "geodesic" and coords.dtype == torch.float64:
        # only a start (and the reported consensus): float32 eigh, ≈2.5× faster at R = 256
        coef, consensus = gram.top(w, p, torch.float32)
        gapped = bool(eigengap(consensus, p, START_GAP).all())
        if not gapped or bool(((consensus - 0.5).abs() < CONSENSUS_HALF_ATOL).any()):
            coef, consensus = gram.top(w, p)
    else:
        coef, consensus = gram.top(w, p)
    x = gram.basis(coef)
    steps = products = torch.zeros(bases.shape[:-3], dtype=torch.long, device=bases.device)
    if distance == "chordal":
        f = _Cost.at(x, coords, w)
        # Riemannian gradient of ½Σ w_k ‖XXᵀ − U_kU_kᵀ‖²_F: −(I − XXᵀ)(Σ w_k U_kU_kᵀ)X, zero at the mean.
        z = gram.z * gram.column_weights(w).sqrt().unsqueeze(-2)
        gnorm = torch.linalg.vector_norm(tangent_projection(x, z @ (z.transpose(-1, -2) @ x)), dim=(-2, -1))
        unique = eigengap(consensus, p)
        lower = hmin = torch.full_like(gnorm, math.nan)
        local = unique
    else:
        if coords.shape[-3] == 2:
            u1, u2 = coords[..., 0, :, :], coords[..., 1, :, :]
            x = grassmann_exp(u1, w[..., 1, None, None] * grassmann_log(u1, u2))
            max_iter = 0
        f, steps, products = _trust_region(x, coords, w, tol, max_iter, gapped)
        x, gnorm = f.x, f.gnorm
        lower = hessian_lower_bound(f.theta, w)
        # the Weyl bound certifies most close sources: Lanczos only where it cannot
        hmin = lower.clone()
        unsure = lower <= 0
        if bool(unsure.any()):
            hmin = torch.where(unsure, _lanczos_min(f), lower)
        local = hmin > 0
    theta = f.theta
    radius = torch.linalg.vector_norm(theta, dim=-1).amax(-1)
    max_angle = theta.amax((-1, -2))
    if distance == "geodesic":
        unique = max_angle < UNIQUE_RADIUS
    pair_dist, pair_angle = _pairwise(gram.gram, coords.shape[-3])
    mean = x if span is None else span @ x
    return KarcherResult(mean, steps, gnorm, radius, max_angle, pair_dist, pair_angle,
                         unique, radius < UNIQUE_RADIUS, gnorm <= tol, products, lower, hmin,
                         local, consensus)
