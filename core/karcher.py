"""Means of subspaces on the Grassmann manifold Gr(p, d): Log/Exp maps, the
extrinsic (chordal) mean and the weighted Karcher (Fréchet) mean.

A point is an orthonormal basis X (d×p); only its span matters. Everything is
batched over leading dimensions (modules of equal shape stacked together):
bases (…, K, d, p), weights (K,) or (…, K). Nothing here forms a d×d matrix
or inverts XᵀY, and small angles keep their digits (θ = atan2(sin, cos), as
in core.grassmann). The mean is computed in coordinates of span(U_1 … U_K):
one QR of the stacked bases, O(d·(Kp)²), then O(K·Kp·p²) a step whatever d.

References: Edelman–Arias–Smith 1998; Absil–Mahony–Sepulchre 2004;
Bendokat–Zimmermann–Absil, arXiv 2011.13699 (formulas); Afsari 2011
(uniqueness within a geodesic ball of radius π/4 on Gr, whose sectional
curvature lies in [0, 2]).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import LoraError
from .grassmann import principal_angles

# The π/4 of Afsari 2011 (½·min(injectivity radius π/2, π/√(max curvature 2))).
# Two readings, both reported:
#  - afsari: all sources within geodesic distance √Σθ² < π/4 of the mean — the
#    theorem's sufficient condition for a unique mean (rarely met at p = 64,
#    where 64 angles of 0.1 rad already give 0.8);
#  - unique: all sources within a largest principal angle < π/4 of the mean. The
#    Hessian of ½d²(·, U) has eigenvalues α·cot α over the roots α ∈ {θ_i ± θ_j,
#    θ_i} of Gr(p, d) (restricted root system B_p), all positive when θ_max < π/4,
#    so every term is strictly convex around the mean and it is an isolated
#    minimum; beyond that the cost stops being convex and means multiply.
UNIQUE_RADIUS = math.pi / 4
DISTANCES = ("geodesic", "chordal")   # Fréchet means offered (see karcher_mean)
ARMIJO = 1e-4                 # sufficient-decrease constant of the line search
NONMONOTONE_MEMORY = 8        # the Armijo test compares with the worst of the last 8 costs
BB_RANGE = (1e-2, 1e2)        # Barzilai–Borwein step kept within these bounds
MIN_STEP = 2.0 ** -30         # a step halved below this means the iteration has stalled
ROUNDING_SLACK = 1e-12        # relative cost change treated as rounding noise
EIGENGAP_RTOL = 1e-8          # chordal mean unique when (λ_p − λ_{p+1})/λ_1 exceeds this
DETERMINISTIC_CHOICE = (
    "two sources: the point at fraction t = w2/(w1+w2) on the geodesic from the first "
    "source chosen by the SVD of U1ᵀU2; more sources: the point reached by gradient "
    "descent (Barzilai–Borwein steps, nonmonotone Armijo search, at most max_iter "
    "gradient evaluations) from the extrinsic (chordal) mean, whose ties between equal "
    "eigenvalues are broken by the eigensolver's order")


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-1, -2)


def _orthonormalize(x: torch.Tensor) -> torch.Tensor:
    """Q of a thin QR with R's diagonal made positive, so that a nearly
    orthonormal x keeps its columns (and their signs): tangent vectors
    transported between iterates must refer to matching columns."""
    q, r = torch.linalg.qr(x)
    sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    return q * torch.where(sign == 0, torch.ones_like(sign), sign).unsqueeze(-2)


def _project(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(I − XXᵀ)V: onto the tangent space at X (also the vector transport we use)."""
    return v - x @ (_t(x) @ v)


def grassmann_log(x: torch.Tensor, y: torch.Tensor, return_angles: bool = False):
    """Log_X(Y): the tangent H at X (XᵀH = 0) with Exp_X(H) = span(Y), ‖H‖_F = d_geo.

    XᵀY = P·cosΘ·Qᵀ (p×p SVD). The columns of (I − XXᵀ)YQ = YQ − X(XᵀY)Q are
    mutually orthogonal with norms sin θ, so θ = atan2(sin, cos) is accurate
    at both ends and Log = (I − XXᵀ)YQ·diag(θ/sin θ)·Pᵀ. At θ = π/2 the
    geodesic is not unique; the SVD's choice is taken (finite, deterministic).
    With return_angles also the principal angles θ (…, p), ascending.
    """
    m = _t(x) @ y
    p, cos, qh = torch.linalg.svd(m)
    q = _t(qh)
    resid = y @ q - x @ (m @ q)
    sin = torch.linalg.vector_norm(resid, dim=-2)
    theta = torch.atan2(sin, cos.clamp(0.0, 1.0))
    tiny = torch.finfo(x.dtype).tiny
    # θ/sin θ → 1 as θ → 0; the column itself is ~0 there anyway.
    ratio = torch.where(sin > tiny, theta / sin.clamp_min(tiny), torch.ones_like(sin))
    log = (resid * ratio.unsqueeze(-2)) @ _t(p)
    return (log, theta) if return_angles else log


def grassmann_exp(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Exp_X(H) = X·V·cosΣ·Vᵀ + U·sinΣ·Vᵀ with H = UΣVᵀ, re-orthonormalised.

    Written as X·cos(√(HᵀH)) + H·sinc(√(HᵀH)): both are analytic functions of
    the p×p matrix HᵀH = VΣ²Vᵀ, so one eigh of it replaces the thin SVD of
    the d×p H (U·sinΣ = H·V·diag(sinΣ/Σ)) without losing digits for small Σ,
    and any eigenbasis of repeated Σ gives the same result.
    """
    lam, v = torch.linalg.eigh(_t(h) @ h)
    s = lam.clamp_min(0.0).sqrt()
    small = s < 1e-4
    sinc = torch.where(small, 1.0 - s * s / 6.0, torch.sin(s) / torch.where(small, torch.ones_like(s), s))
    y = (x @ v) * torch.cos(s).unsqueeze(-2) + (h @ v) * sinc.unsqueeze(-2)
    return _orthonormalize(y @ _t(v))


def _check_weights(weights: torch.Tensor | list | tuple, k: int, like: torch.Tensor) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=like.dtype, device=like.device)
    if w.shape[-1] != k:
        raise LoraError(f"{w.shape[-1]} weight(s) for {k} subspaces")
    if not torch.isfinite(w).all():
        raise LoraError("subspace weights must be finite")
    if (w <= 0).any():
        raise LoraError("Karcher/extrinsic mean weights must be positive: a zero weight means "
                        "leaving the source out, and a negative weight has no Fréchet-mean "
                        "meaning (use the linear or svd merge to subtract a LoRA)")
    # The minimiser of Σ w_k d²(X, U_k) does not change when all weights are
    # scaled; normalising to Σ w = 1 makes X ← Exp_X(Σ w_k Log_X U_k) the natural
    # (Newton-like for nearby points) step and keeps tolerances scale-free.
    return w / w.sum(-1, keepdim=True)


def _stack_weighted(bases: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Z = [√w_1 U_1, …, √w_K U_K] (…, d, K·p), so that ZZᵀ = Σ w_k U_kU_kᵀ."""
    z = bases * w.sqrt()[..., None, None]
    *lead, k, d, p = z.shape
    return z.movedim(-3, -2).reshape(*lead, d, k * p)


def _extrinsic(bases: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p eigenvectors of Σ w_k U_kU_kᵀ and the relative eigen-gap (λ_p − λ_{p+1})/λ_1."""
    p = bases.shape[-1]
    z = _stack_weighted(bases, w)
    lam, vec = torch.linalg.eigh(_t(z) @ z)            # Kp×Kp, ascending; same nonzero spectrum as ZZᵀ
    lam, vec = lam.flip(-1), vec.flip(-1)
    top = lam[..., :p].clamp_min(torch.finfo(z.dtype).tiny)
    mean = _orthonormalize((z @ vec[..., :p]) / top.sqrt().unsqueeze(-2))
    nxt = lam[..., p] if lam.shape[-1] > p else torch.zeros_like(lam[..., 0])
    return mean, (lam[..., p - 1] - nxt) / lam[..., 0]


def extrinsic_mean(bases: torch.Tensor, weights) -> torch.Tensor:
    """The extrinsic (chordal) mean: span of the top-p eigenvectors of Σ w_k U_kU_kᵀ,
    from the (Kp×Kp) Gram matrix of the stacked √w_k·U_k. It is the Fréchet mean
    under the chordal distance √Σsin²θ and the starting point of karcher_mean."""
    w = _check_weights(weights, bases.shape[-3], bases)
    return _extrinsic(bases, w)[0]


@dataclass
class KarcherResult:
    """Per batch element: the mean basis and how it was reached.

    radius = max_k d_geo(mean, U_k); max_angle = largest principal angle of any
    source to the mean; pairwise_* = the same between the sources themselves;
    unique = max_angle < π/4 and afsari = radius < π/4 (see UNIQUE_RADIUS; for
    the chordal mean unique = a nonzero eigen-gap λ_p > λ_{p+1});
    converged = grad_norm ≤ tol; iterations = gradient evaluations.
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
    distance: str = "geodesic"
    choice: str = DETERMINISTIC_CHOICE


def _logs(x: torch.Tensor, bases: torch.Tensor, w: torch.Tensor):
    """Riemannian descent direction Σ w_k Log_X(U_k), cost ½Σ w_k d², and the angles."""
    logs, theta = grassmann_log(x.unsqueeze(-3), bases, return_angles=True)
    grad = (logs * w[..., None, None]).sum(-3)
    cost = 0.5 * (w * (theta * theta).sum(-1)).sum(-1)
    return grad, cost, theta


def _pairwise(bases: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k = bases.shape[-3]
    lead = bases.shape[:-3]
    if k < 2:
        z = bases.new_zeros(lead)
        return z, z
    i, j = torch.triu_indices(k, k, 1, device=bases.device)
    theta = principal_angles(bases[..., i, :, :], bases[..., j, :, :])
    return (torch.linalg.vector_norm(theta, dim=-1).amax(-1), theta.amax((-1, -2)))


def _span_coordinates(bases: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """An orthonormal basis Q (…, d, Kp) of span(U_1 … U_K) and the coordinates
    C_k = QᵀU_k (…, K, Kp, p), or (None, bases) when Kp ≥ d.

    Log_X(U_k) lies in span(X, U_k) and Exp_X(H) in span(X, H), so from a start
    inside the span every iterate stays there: the mean is computed on
    Gr(p, Kp) at a cost independent of d, with the same angles (Q is an isometry).
    """
    *lead, k, d, p = bases.shape
    if k * p >= d:
        return None, bases
    q, r = torch.linalg.qr(bases.movedim(-3, -2).reshape(*lead, d, k * p))
    return q, r.reshape(*lead, k * p, k, p).movedim(-2, -3)


def _descend(x, coords, w, tol, max_iter):
    """Riemannian gradient descent with Barzilai–Borwein steps and a nonmonotone
    Armijo test (Iannazzo & Porcelli 2018), per batch element.

    Far-apart sources make the cost nearly flat in some directions, where the
    plain step X ← Exp_X(Σ w_k Log_X U_k) crawls; BB steps adapt to that
    curvature and the line search (step halved on failure) keeps the cost
    going down. A step is also taken when the cost is level to rounding and
    the gradient shrinks, so the iteration reaches the rounding floor.
    Returns x, gradient, angles, number of gradient evaluations.
    """
    grad, cost, theta = _logs(x, coords, w)
    gnorm = torch.linalg.vector_norm(grad, dim=(-2, -1))
    step = torch.ones_like(gnorm)
    history = cost.unsqueeze(-1).repeat_interleave(NONMONOTONE_MEMORY, -1)
    evals = torch.zeros_like(gnorm, dtype=torch.long)
    while True:
        active = (gnorm > tol) & (evals < max_iter) & (step >= MIN_STEP)
        if not bool(active.any()):
            break
        cand = grassmann_exp(x, grad * step[..., None, None])
        c_grad, c_cost, c_theta = _logs(cand, coords, w)
        c_gnorm = torch.linalg.vector_norm(c_grad, dim=(-2, -1))
        slack = ROUNDING_SLACK * cost.abs().clamp_min(1.0)
        ok = active & ((c_cost <= history.amax(-1) - ARMIJO * step * gnorm * gnorm)
                       | ((c_cost <= cost + slack) & (c_gnorm < gnorm)))
        # BB step ⟨s,s⟩/⟨s,y⟩ with s = the step and y = the change of ∇f = −grad,
        # both moved to the new point by projection.
        s = _project(cand, grad * step[..., None, None])
        y = _project(cand, grad) - c_grad
        sy = (s * y).sum((-2, -1))
        bb = torch.where(sy > 0, (s * s).sum((-2, -1)) / torch.where(sy > 0, sy, torch.ones_like(sy)),
                         torch.ones_like(sy)).clamp(BB_RANGE[0], BB_RANGE[1])
        okm = ok[..., None, None]
        x = torch.where(okm, cand, x)
        grad = torch.where(okm, c_grad, grad)
        theta = torch.where(okm, c_theta, theta)
        cost = torch.where(ok, c_cost, cost)
        gnorm = torch.where(ok, c_gnorm, gnorm)
        history = torch.where(ok.unsqueeze(-1), torch.cat([history[..., 1:], c_cost.unsqueeze(-1)], -1),
                              history)
        step = torch.where(ok, bb, torch.where(active, step / 2, step))
        evals += active.long()
    return x, grad, theta, evals


def karcher_mean(bases: torch.Tensor, weights, tol: float | None = None, max_iter: int = 50,
                 distance: str = "geodesic") -> KarcherResult:
    """Weighted Fréchet mean of K points on Gr(p, d), batched: bases (…, K, d, p).

    distance="geodesic" (the Karcher mean): minimises ½Σ w_k d_geo²(X, U_k) by
    Riemannian gradient descent from the extrinsic mean (see _descend), and
    stops on the gradient norm ‖Σ w_k Log_X U_k‖_F ≤ tol, never on a change of
    basis; iterations = gradient evaluations, at most max_iter. Two sources:
    the closed form Exp_{U1}(t·Log_{U1}U2), t = w2/(w1+w2), no iteration.
    distance="chordal": the mean under √Σsin²θ, which is exactly the extrinsic
    mean. The other distances of core.measures have no mean offered here.

    Weights must be positive (any scale; normalised). tol defaults to 1e-10 rad
    in float64, 1e-5 in float32. Outside the π/4 ball the mean is not unique;
    the result is still a finite orthonormal basis, by DETERMINISTIC_CHOICE.
    """
    if distance not in DISTANCES:
        raise LoraError(f"no Fréchet mean offered for distance '{distance}' (supported: "
                        f"{', '.join(DISTANCES)})")
    if bases.dim() < 3 or bases.shape[-1] > bases.shape[-2]:
        raise LoraError(f"bases must be (…, K, d, p) with p ≤ d, got {tuple(bases.shape)}")
    w = _check_weights(weights, bases.shape[-3], bases).expand(bases.shape[:-2])
    if tol is None:
        tol = 1e-10 if bases.dtype == torch.float64 else 1e-5
    span, coords = _span_coordinates(bases)
    x, gap = _extrinsic(coords, w)
    evals = torch.zeros(bases.shape[:-3], dtype=torch.long, device=bases.device)
    if distance == "chordal":
        # Riemannian gradient of ½Σ w_k ‖XXᵀ − U_kU_kᵀ‖²_F: −(I − XXᵀ)(Σ w_k U_kU_kᵀ)X, zero at the mean.
        z = _stack_weighted(coords, w)
        gnorm = torch.linalg.vector_norm(_project(x, z @ (_t(z) @ x)), dim=(-2, -1))
        theta = grassmann_log(x.unsqueeze(-3), coords, return_angles=True)[1]
        unique = gap > EIGENGAP_RTOL
    else:
        if coords.shape[-3] == 2:
            u1, u2 = coords[..., 0, :, :], coords[..., 1, :, :]
            x = grassmann_exp(u1, w[..., 1, None, None] * grassmann_log(u1, u2))
            max_iter = 0
        x, grad, theta, evals = _descend(x, coords, w, tol, max_iter)
        gnorm = torch.linalg.vector_norm(grad, dim=(-2, -1))
    radius = torch.linalg.vector_norm(theta, dim=-1).amax(-1)
    max_angle = theta.amax((-1, -2))
    if distance == "geodesic":
        unique = max_angle < UNIQUE_RADIUS
    pair_dist, pair_angle = _pairwise(coords)
    mean = x if span is None else span @ x
    return KarcherResult(mean, evals, gnorm, radius, max_angle, pair_dist, pair_angle,
                         unique, radius < UNIQUE_RADIUS, gnorm <= tol, distance)
